"""The training loop: schedule → rollout → teacher answers → learner update → weight sync → log / eval / save.

The config it takes has its models resolved (`preflight.preflight` returns it: no `zoo:` names). The loss's
registered spec (`learner/registry.py`) says which teacher query feeds it; the learner is anything satisfying
`learner.api.LearnerAPI` (in-process or Ray ranks).

Step s (1-based) trains on the task(s) `TaskSchedule.tasks_at(s - 1)`; its rollouts use seed mix(run.seed, s), so a
resumed run replays exactly the prompts and sampling an uninterrupted run would. With `fidelity.every`, the
signal-fidelity monitor (`run/fidelity.py`) probes the step's rollouts before the update, and a run whose probes
keep failing stops with a `SignalFidelityError` (its count of consecutive failures is checkpointed). Checkpoint
`step_<s>` holds the state after s updates; `--resume` restarts from the newest complete one and drops later metric
records.

`run.pipeline: async` makes the next steps' rollouts and teacher answers on two driver threads while the learner trains
(`run/pipeline.py`: a schedule fixed by the config, staleness at most `run.max_staleness` updates, evaluation and
checkpoint steps as barriers): `_roll_out`, `_score` (teacher answers) and `_learn` (probe + update) are its three
stages, which the sync loop runs in turn.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from opd_agents.config import Config, config_dict
from opd_agents.learner.api import LearnerAPI, build_learner
from opd_agents.learner.lora import ADAPTER_DIR
from opd_agents.learner.registry import get_loss
from opd_agents.rollout.group import RolloutGroup
from opd_agents.run.checkpoint import TrainerState, load_latest, rng_state, save_checkpoint, set_rng_state
from opd_agents.run.cluster import init_ray
from opd_agents.run.evaluation import Evaluator
from opd_agents.run.fidelity import FidelityMonitor
from opd_agents.run.metrics import MetricsLogger
from opd_agents.run.pipeline import Producer, StepBatch, barriers, rollout_versions
from opd_agents.run.progress import Progress
from opd_agents.run.report import render_run
from opd_agents.run.rundir import RunDir
from opd_agents.run.schedule import TaskSchedule
from opd_agents.samples import Sample, TeacherTopK
from opd_agents.seeding import mix_seed, seed_everything
from teachers.router import TeacherRouter


class Trainer:
    def __init__(self, cfg: Config, run_dir: RunDir, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.schedule = TaskSchedule(cfg)
        self.teacher_query = get_loss(cfg.loss.name).teacher_query(cfg.loss)
        self.fidelity = FidelityMonitor(cfg.fidelity, cfg.loss.name, cfg.run.seed)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        found = load_latest(self.run_dir.checkpoints_dir, TrainerState) if self.resume else None
        ckpt, state = found if found is not None else (None, {})
        start = 0
        student_path = cfg.student.path
        adapter = None
        if ckpt is not None:
            start = int(state["step"])
            # LoRA resumes the saved adapter on the base model; full fine-tuning resumes the saved weights.
            if cfg.learner.lora is not None:
                adapter = str(ckpt / ADAPTER_DIR)
            else:
                student_path = str(ckpt)
        init_ray(cfg.ray)
        learner = build_learner(cfg, student_path, adapter)
        if ckpt is not None:
            learner.load_state(state["learner"], ckpt)
            set_rng_state(state["rng"])
            self.fidelity.failed = int(state.get("failed_probes", 0))
        router = TeacherRouter.from_config(cfg, student_vocab=learner.tokenizer.get_vocab())
        group = RolloutGroup.from_config(cfg)
        group.sync_weights(learner.weights(), start)
        logger = MetricsLogger(self.run_dir.root, cfg.logging, run_name=cfg.run.name,
                               config_dict=config_dict(cfg), resume_step=start + 1 if start else 0)
        evaluator = Evaluator(cfg, self.run_dir)
        producer: Producer | None = None
        try:
            with Progress(cfg, start) as progress:
                if start == 0 and cfg.run.eval_before:
                    logger.log_metrics(evaluator.run(group, step=0, label="before"), 0)
                if cfg.run.pipeline == "async":
                    producer = self._producer(start, group, router, learner)
                for step in range(start + 1, cfg.run.steps + 1):
                    last = step == cfg.run.steps
                    evaluate = bool(cfg.run.eval_every and step % cfg.run.eval_every == 0 and not last)
                    save = last or bool(cfg.run.save_every and step % cfg.run.save_every == 0)
                    if producer is None:
                        metrics = self._train_step(step, group, router, learner)
                    else:
                        metrics = self._async_step(step, producer, group, router, learner, evaluate or last)
                    logger.log_metrics(metrics, step)
                    self.fidelity.check(metrics)
                    progress.update(step, metrics)
                    if evaluate:
                        logger.log_metrics(evaluator.run(group, step=step), step)
                    if save:
                        self._save(step, learner)
                    if producer is not None and evaluate:
                        producer.publish(step, None)  # synced for the evaluation: the rollout side goes on
                if producer is not None:
                    producer.close()
                final = evaluator.run(group, step=cfg.run.steps, label="final")
                logger.log_metrics(final, cfg.run.steps)
            # Free the student's rollout and learner actors first: the teacher policies need those resources.
            group.shutdown()
            learner.shutdown()
            if cfg.eval.teacher_reference:
                logger.log_metrics(evaluator.run_teacher_reference(), cfg.run.steps)
        finally:
            if producer is not None:
                producer.close(wait_s=0.0)  # no new step; the calls in flight end when the group is shut down
            logger.close()
            group.shutdown()
            if producer is not None:
                producer.close(wait_s=60.0)  # before the teachers go: its scoring thread may be in a teacher call
            router.close()
            learner.shutdown()
        evaluator.write_summary()
        render_run(self.run_dir.root)
        return final

    def _producer(self, start: int, group: RolloutGroup, router: TeacherRouter, learner: LearnerAPI) -> Producer:
        """The async pipeline's rollout side, started; the workers hold version `start` (synced in `fit`)."""
        run = self.cfg.run
        versions = rollout_versions(start, run.steps, run.max_staleness,
                                    barriers(start, run.steps, run.eval_every, run.save_every))
        producer = Producer(versions, lambda step: self._roll_out(step, group),
                            lambda batch: self._score(batch, router, learner), group.sync_weights,
                            run.pipeline_timeout_s, synced=start)
        producer.publish(start, None)
        producer.start()
        return producer

    def _teacher_answers(self, task: str, samples: list[Sample], router: TeacherRouter, learner: LearnerAPI,
                         ) -> list[TeacherTopK]:
        """The teacher query the loss's spec names: top-K (`loss.k`), scores at the student's own top-K ids, or
        the full distribution (K = the vocabulary)."""
        k = self.cfg.loss.k
        if self.teacher_query == "score":
            return router.score(task, samples, learner.student_topk_ids(samples, k))
        return router.topk(task, samples, learner.vocab_size if self.teacher_query == "full" else k)

    def _roll_out(self, step: int, group: RolloutGroup) -> StepBatch:
        """Step `step`'s rollouts, per task (seed mix(run.seed, step, task index))."""
        batch = StepBatch(step, self.schedule.tasks_at(step - 1), timing={"rollout": 0.0})
        ended: dict[str, dict[str, int]] = {}  # task -> episode end reasons, for the no-sample error
        t = time.perf_counter()
        for i, (task_name, n_prompts) in enumerate(batch.plan.items()):
            rollout = group.rollout(self.cfg.task(task_name), num_prompts=n_prompts,
                                    seed=mix_seed(self.cfg.run.seed, step, i))
            ended[task_name] = dict(Counter(ep.end_reason for ep in rollout.episodes))
            batch.task_samples[task_name] = rollout.samples
            batch.metrics |= {f"{task_name}/{key}": v for key, v in rollout.metrics.items()}
        batch.timing["rollout"] = time.perf_counter() - t
        if not any(batch.task_samples.values()):
            raise RuntimeError(
                f"step {step}: the rollouts produced no sample to train on (episode end reasons per task: {ended}). "
                "With 'context_overflow' the prompts do not fit the student's context: raise the model's max length "
                "or shorten the task's prompts / max_turns")
        return batch

    def _score(self, batch: StepBatch, router: TeacherRouter, learner: LearnerAPI) -> StepBatch:
        """The teacher's answers to the batch's samples, task by task, in the plan's order."""
        t = time.perf_counter()
        for task_name, samples in batch.task_samples.items():
            batch.samples += samples
            batch.teacher_out += self._teacher_answers(task_name, samples, router, learner)
        batch.timing["teacher"] = time.perf_counter() - t
        return batch

    def _learn(self, batch: StepBatch, router: TeacherRouter, learner: LearnerAPI) -> dict[str, Any]:
        """The fidelity probe when due, then the update: the step's metrics, timings in `batch.timing`."""
        metrics = dict(batch.metrics)
        if self.fidelity.due(batch.step):
            t = time.perf_counter()
            metrics |= self.fidelity.probe(batch.step, batch.samples, batch.teacher_out, router, learner)
            batch.timing["fidelity"] = time.perf_counter() - t
        t = time.perf_counter()
        # One task per step wherever a task scales the rate (config validation), so the first task's scale is the
        # step's.
        update = learner.update(batch.samples, batch.teacher_out, self.cfg.task(next(iter(batch.plan))).lr_scale)
        batch.timing["learner"] = time.perf_counter() - t
        tasks = "+".join(batch.plan)
        metrics |= {f"train/{key}": v for key, v in update.items()}
        if "+" not in tasks:  # one task this step: also keep its curves apart from the other tasks'
            metrics |= {f"{tasks}/train/{key}": v for key, v in update.items()}
        return metrics

    @staticmethod
    def _finish(metrics: dict[str, Any], batch: StepBatch, t0: float) -> dict[str, Any]:
        metrics |= {f"time/{key}": v for key, v in batch.timing.items()}
        metrics["time/step"] = time.perf_counter() - t0
        metrics["task"] = "+".join(batch.plan)
        return metrics

    def _train_step(self, step: int, group: RolloutGroup, router: TeacherRouter, learner: LearnerAPI,
                    ) -> dict[str, Any]:
        """The sync pipeline's step: rollouts, teacher answers, update, weight sync, one after another."""
        t0 = time.perf_counter()
        batch = self._score(self._roll_out(step, group), router, learner)
        metrics = self._learn(batch, router, learner)
        t = time.perf_counter()
        group.sync_weights(learner.weights(), step)
        batch.timing["sync"] = time.perf_counter() - t
        return self._finish(metrics, batch, t0)

    def _async_step(self, step: int, producer: Producer, group: RolloutGroup, router: TeacherRouter,
                    learner: LearnerAPI, sync_here: bool) -> dict[str, Any]:
        """The async pipeline's step: take the rollout side's batch, update, and publish the new weights when a
        later step rolls out with them; before an evaluation (`sync_here`) sync them into the workers here instead:
        the rollout side is idle then, waiting for exactly these weights (an evaluation step is a barrier)."""
        t0 = time.perf_counter()
        batch = producer.batch(step)
        wait = time.perf_counter() - t0
        waited_before = producer.wait_s
        metrics = self._learn(batch, router, learner)
        t = time.perf_counter()
        if sync_here:
            group.sync_weights(learner.weights(), step)
            batch.timing["sync"] = batch.timing.get("sync", 0.0) + time.perf_counter() - t
        elif producer.needs(step):
            producer.publish(step, learner.weights())
            batch.timing["publish"] = time.perf_counter() - t
        batch.timing["wait_for_rollouts"] = wait
        metrics["pipeline/staleness"] = step - 1 - batch.version
        metrics["time/rollout_side_wait"] = producer.wait_s - waited_before
        return self._finish(metrics, batch, t0)

    def _save(self, step: int, learner: LearnerAPI) -> None:
        state = {"step": step, "learner": learner.state(), "rng": rng_state(), "failed_probes": self.fidelity.failed}
        save_checkpoint(self.run_dir.checkpoints_dir, step, learner.save_pretrained, state, self.cfg.run.keep_last)
