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
        try:
            with Progress(cfg, start) as progress:
                if start == 0 and cfg.run.eval_before:
                    logger.log_metrics(evaluator.run(group, step=0, label="before"), 0)
                for step in range(start + 1, cfg.run.steps + 1):
                    metrics = self._train_step(step, group, router, learner)
                    logger.log_metrics(metrics, step)
                    self.fidelity.check(metrics)
                    progress.update(step, metrics)
                    last = step == cfg.run.steps
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and not last:
                        logger.log_metrics(evaluator.run(group, step=step), step)
                    if last or (cfg.run.save_every and step % cfg.run.save_every == 0):
                        self._save(step, learner)
                final = evaluator.run(group, step=cfg.run.steps, label="final")
                logger.log_metrics(final, cfg.run.steps)
            # Free the student's rollout and learner actors first: the teacher policies need those resources.
            group.shutdown()
            learner.shutdown()
            if cfg.eval.teacher_reference:
                logger.log_metrics(evaluator.run_teacher_reference(), cfg.run.steps)
        finally:
            logger.close()
            group.shutdown()
            router.close()
            learner.shutdown()
        evaluator.write_summary()
        render_run(self.run_dir.root)
        return final

    def _teacher_answers(self, task: str, samples: list[Sample], router: TeacherRouter, learner: LearnerAPI,
                         ) -> list[TeacherTopK]:
        """The teacher query the loss's spec names: top-K (`loss.k`), scores at the student's own top-K ids, or
        the full distribution (K = the vocabulary)."""
        k = self.cfg.loss.k
        if self.teacher_query == "score":
            return router.score(task, samples, learner.student_topk_ids(samples, k))
        return router.topk(task, samples, learner.vocab_size if self.teacher_query == "full" else k)

    def _train_step(self, step: int, group: RolloutGroup, router: TeacherRouter, learner: LearnerAPI,
                    ) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        samples: list[Sample] = []
        teacher_out: list[TeacherTopK] = []
        timing = {"rollout": 0.0, "teacher": 0.0}
        plan = self.schedule.tasks_at(step - 1)
        ended: dict[str, dict[str, int]] = {}  # task -> episode end reasons, for the no-sample error
        for i, (task_name, n_prompts) in enumerate(plan.items()):
            task = self.cfg.task(task_name)
            t = time.perf_counter()
            batch = group.rollout(task, num_prompts=n_prompts, seed=mix_seed(self.cfg.run.seed, step, i))
            timing["rollout"] += time.perf_counter() - t
            t = time.perf_counter()
            task_samples = batch.samples
            ended[task_name] = dict(Counter(ep.end_reason for ep in batch.episodes))
            outs = self._teacher_answers(task_name, task_samples, router, learner)
            timing["teacher"] += time.perf_counter() - t
            samples += task_samples
            teacher_out += outs
            metrics |= {f"{task_name}/{key}": v for key, v in batch.metrics.items()}
        if not samples:
            raise RuntimeError(
                f"step {step}: the rollouts produced no sample to train on (episode end reasons per task: {ended}). "
                "With 'context_overflow' the prompts do not fit the student's context: raise the model's max length "
                "or shorten the task's prompts / max_turns")
        if self.fidelity.due(step):
            t = time.perf_counter()
            metrics |= self.fidelity.probe(step, samples, teacher_out, router, learner)
            timing["fidelity"] = time.perf_counter() - t
        t = time.perf_counter()
        # One task per step wherever a task scales the rate (config validation), so the first task's scale is the
        # step's.
        update = learner.update(samples, teacher_out, self.cfg.task(next(iter(plan))).lr_scale)
        timing["learner"] = time.perf_counter() - t
        t = time.perf_counter()
        group.sync_weights(learner.weights(), step)
        timing["sync"] = time.perf_counter() - t
        tasks = "+".join(plan)
        metrics |= {f"train/{key}": v for key, v in update.items()}
        if "+" not in tasks:  # one task this step: also keep its curves apart from the other tasks'
            metrics |= {f"{tasks}/train/{key}": v for key, v in update.items()}
        metrics |= {f"time/{key}": v for key, v in timing.items()}
        metrics["time/step"] = time.perf_counter() - t0
        metrics["task"] = tasks
        return metrics

    def _save(self, step: int, learner: LearnerAPI) -> None:
        state = {"step": step, "learner": learner.state(), "rng": rng_state(), "failed_probes": self.fidelity.failed}
        save_checkpoint(self.run_dir.checkpoints_dir, step, learner.save_pretrained, state, self.cfg.run.keep_last)
