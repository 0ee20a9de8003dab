"""Rollout groups: fan a request (task, P prompts × G rollouts) out over workers and gather the episodes.

`RolloutGroup` runs N `RolloutWorker` Ray actors; `LocalRolloutGroup` runs one worker in-process with the
same API (debugging, tests). A call splits its episodes into one chunk per worker; each chunk carries the
group's current weight version, which the worker checks, so no batch mixes weights.

`sync_weights`: with `rollout.backend: vllm` this process sends the tensors straight into every worker's engine
through vLLM's weight-transfer API (weight_sync.WorkerSenders: one transfer group per worker, formed on its first
sync, all fed at once); the hf backend gets the state dict through the object store (put once, the same reference
for every worker).

Fault tolerance (Ray): a worker that dies mid-request (RayActorError) or does not answer within
`rollout.call_timeout_s` (a hung env step, a wedged process) is killed and replaced by a new actor, given the current
weights (vllm: its new engine joins a new transfer group and receives them), and its chunk is re-run; restarts are
counted in `rollout/worker_restarts`. More than `rollout.max_restarts` restarts within one call raise
`RolloutWorkerError`; episodes are never dropped. A worker whose weight sync fails is replaced the same way. Every
wait is bounded: actor start-up by `rollout.start_timeout_s` (an unschedulable request — more CPUs or GPUs than the
cluster has — ends there with the cluster's resources in the message), results and weight syncs by
`rollout.call_timeout_s`.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from opd_agents.config import Config, ModelConfig, RolloutConfig, TaskConfig
from opd_agents.rollout.episode import Episode, EpisodeSpec
from opd_agents.rollout.progress import POLL_S, READ_TIMEOUT_S, EpisodeCounter, ProgressFn
from opd_agents.rollout.request import RolloutRequest, chunk_seed, eval_specs, split, training_specs
from opd_agents.rollout.stats import rollout_metrics
from opd_agents.rollout.worker import RolloutWorker
from opd_agents.samples import Sample
from opd_agents.sampling import SamplingParams
from opd_agents.seeding import mix_seed


class RolloutWorkerError(RuntimeError):
    """Rollout workers kept dying or hanging within one request, or could not start."""


@dataclass
class RolloutBatch:
    """The result of one rollout call: episodes (in request order), their samples, and metrics."""

    episodes: list[Episode]
    metrics: dict[str, float]

    @property
    def samples(self) -> list[Sample]:
        return [s for e in self.episodes for s in e.samples]


class _Group(ABC):
    """Request layout, sampling parameters, metrics and evaluation shared by both groups."""

    def __init__(self, student: ModelConfig, rollout: RolloutConfig, *, imports: Sequence[str] = (),
                 seed: int = 0) -> None:
        self.student, self.rollout_cfg, self.imports, self.seed = student, rollout, list(imports), seed
        self._version = 0
        self._calls = 0

    @classmethod
    def from_config(cls, cfg: Config) -> _Group:
        return cls(cfg.student, cfg.rollout, imports=cfg.run.imports, seed=cfg.run.seed)

    @property
    def version(self) -> int:
        return self._version

    @property
    @abstractmethod
    def num_workers(self) -> int: ...

    @abstractmethod
    def _execute(self, requests: list[RolloutRequest], poll: Callable[[], None] | None = None,
                 ) -> tuple[list[Episode], int]:
        """Run one request per worker; returns the episodes in request order and the restart count. `poll`, when
        given, is called every `progress.POLL_S` seconds or so while the workers run."""

    @abstractmethod
    def _counter(self, progress: ProgressFn) -> Any:
        """An `EpisodeCounter` the workers can reach (reporting to `progress` where it can)."""

    @abstractmethod
    def _read(self, counter: Any) -> tuple[int, int] | None:
        """(done, successes) of `_counter`'s counter; None when it cannot be read (progress is never worth failing a
        call over)."""

    def _report(self, counter: Any, progress: ProgressFn) -> None:
        counts = self._read(counter)
        if counts is not None:
            progress(*counts)

    @abstractmethod
    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Push new student weights (HF names) to every worker and make `version` current."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers and their envs."""

    def sampling_params(self, task: TaskConfig, greedy: bool = False) -> SamplingParams:
        r = self.rollout_cfg
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=task.max_new_tokens, greedy=greedy)

    def _call(self, task: TaskConfig, specs: list[EpisodeSpec], params: SamplingParams, seed: int | None,
              evaluation: bool, progress: ProgressFn | None = None) -> RolloutBatch:
        start = time.perf_counter()
        counter = None if progress is None else self._counter(progress)
        requests = [RolloutRequest(task, chunk, params, self._version, chunk_seed(seed, i), evaluation, counter)
                    for i, chunk in enumerate(split(specs, self.num_workers))]
        episodes, restarts = self._execute(requests, None if counter is None else lambda: self._report(
            counter, progress))
        if progress is not None:
            progress(len(episodes), sum(ep.success for ep in episodes))
        if len(episodes) != len(specs):
            raise RolloutWorkerError(f"rollout returned {len(episodes)} episodes for {len(specs)} requested.")
        return RolloutBatch(episodes, rollout_metrics(episodes, time.perf_counter() - start, restarts))

    def rollout(self, task: TaskConfig, *, num_prompts: int | None = None, group_size: int | None = None,
                seed: int | None = None) -> RolloutBatch:
        """P prompts × G rollouts of `task` with the rollout sampling settings (defaults from RolloutConfig).

        `seed` fixes prompts and sampling; None derives a fresh one from the group seed and a call counter.
        """
        self._calls += 1
        seed = mix_seed(self.seed, self._calls) if seed is None else seed
        specs = training_specs(task.name, num_prompts or self.rollout_cfg.prompts_per_step,
                               group_size or self.rollout_cfg.group_size, seed)
        return self._call(task, specs, self.sampling_params(task), seed, evaluation=False)

    def evaluate_episodes(self, task: TaskConfig, n_episodes: int | None = None, *, greedy: bool = True, k: int = 1,
                          seed: int = 0, items: Sequence[int] | None = None,
                          progress: ProgressFn | None = None) -> RolloutBatch:
        """Eval items × k samples, on the eval env kwargs: the item ids `items` in that order, else items 0..n-1
        (n defaults to task.eval_episodes). `progress(done, successes)` hears the counts while the episodes run."""
        chosen = list(items) if items is not None else (n_episodes or task.eval_episodes)
        return self._call(task, eval_specs(task.name, chosen, k), self.sampling_params(task, greedy), seed,
                          evaluation=True, progress=progress)

    def evaluate(self, task: TaskConfig, n_episodes: int | None = None, *, greedy: bool = True, k: int = 1,
                 seed: int = 0) -> list[dict[str, Any]]:
        """`evaluate_episodes` as one JSON-safe dict per episode: index, sample, success, reward, turns,
        format_errors, end_reason, and task_type when the env reports one."""
        results = []
        for i, ep in enumerate(self.evaluate_episodes(task, n_episodes, greedy=greedy, k=k, seed=seed).episodes):
            row = {"index": i // k, "sample": i % k, "success": ep.success, "reward": ep.reward,
                   "turns": ep.num_turns, "format_errors": ep.format_errors, "end_reason": ep.end_reason}
            if "task_type" in ep.info:
                row["task_type"] = ep.info["task_type"]
            results.append(row)
        return results


class _ReportingCounter(EpisodeCounter):
    """An in-process counter that reports every new count."""

    def __init__(self, progress: ProgressFn) -> None:
        super().__init__()
        self.progress = progress

    def add(self, success: bool) -> None:
        super().add(success)
        self.progress(*self.snapshot())


class LocalRolloutGroup(_Group):
    """One in-process worker, no Ray: same API as RolloutGroup."""

    def __init__(self, student: ModelConfig, rollout: RolloutConfig, *, imports: Sequence[str] = (),
                 seed: int = 0) -> None:
        super().__init__(student, rollout, imports=imports, seed=seed)
        self.worker = RolloutWorker(student, rollout, imports=imports, seed=seed)

    @property
    def num_workers(self) -> int:
        return 1

    def _counter(self, progress: ProgressFn) -> EpisodeCounter:
        return _ReportingCounter(progress)

    def _read(self, counter: EpisodeCounter) -> tuple[int, int]:
        return counter.snapshot()

    def _execute(self, requests: list[RolloutRequest], poll: Callable[[], None] | None = None,
                 ) -> tuple[list[Episode], int]:
        # In-process: the counter reports each episode itself (`_ReportingCounter`), nothing to poll.
        return [ep for req in requests for ep in self.worker.run(req)], 0

    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.worker.load_weights(state_dict, version)
        self._version = version

    def shutdown(self) -> None:
        self.worker.close()


class RolloutGroup(_Group):
    """N RolloutWorker Ray actors with restart-on-death."""

    def __init__(self, student: ModelConfig, rollout: RolloutConfig, *, imports: Sequence[str] = (), seed: int = 0,
                 ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RolloutGroup needs a running Ray cluster: call "
                               "opd_agents.run.cluster.init_ray(cfg.ray) first (the entry points do)")
        if rollout.backend == "vllm":
            from opd_agents.rollout.vllm_policy import transfer_backend

            # Resolved here, in the process that sends, so that every engine is created for the same engine.
            backend = transfer_backend(rollout.weight_transfer, engines_on_cuda=rollout.num_gpus_per_worker > 0)
            rollout = rollout.model_copy(update={"weight_transfer": backend})
        super().__init__(student, rollout, imports=imports, seed=seed)
        self._actor_cls = ray.remote(num_cpus=rollout.num_cpus_per_worker, num_gpus=rollout.num_gpus_per_worker,
                                     max_restarts=0)(RolloutWorker)
        self._weights_ref: ray.ObjectRef | None = None  # hf: the current weights in the object store
        self._state: dict[str, torch.Tensor] | None = None  # vllm: the current weights, for a replacement worker
        self._senders: Any = None  # vllm: weight_sync.WorkerSenders, made on the first sync
        self._progress_counter: Any = None  # the EpisodeCounter actor of calls that report progress
        self.workers = [self._actor_cls.remote(student, rollout, imports=self.imports, seed=mix_seed(seed, i))
                        for i in range(rollout.num_workers)]
        try:  # surface start-up errors here, not mid-step
            ray.get([w.version.remote() for w in self.workers], timeout=rollout.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RolloutWorkerError(self._start_failure(rollout.num_workers)) from None

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def _start_failure(self, count: int, what: str = "rollout workers") -> str:
        r = self.rollout_cfg
        want = f"{count} actor(s) × {r.num_cpus_per_worker:g} CPU" + (
            f" + {r.num_gpus_per_worker:g} GPU" if r.num_gpus_per_worker else "")
        have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        return (f"{what} did not start within rollout.start_timeout_s = {r.start_timeout_s:g} s; requested "
                f"{want}, the cluster has {have or 'no CPU/GPU'} available. Lower rollout.num_workers or the "
                "per-worker resources, free the cluster, or raise rollout.start_timeout_s if models load slowly.")

    def _respawn(self, i: int) -> None:
        """Replace worker i by a fresh actor holding the current weights (none once the group is shut down)."""
        if not self.workers:
            raise RolloutWorkerError("the rollout group was shut down while one of its calls ran")
        try:
            ray.kill(self.workers[i], no_restart=True)
        except ValueError:
            pass  # already gone
        if self._senders is not None:
            self._senders.close(i)
        worker = self._actor_cls.remote(self.student, self.rollout_cfg, imports=self.imports,
                                        seed=mix_seed(self.seed, i, self._calls))
        ready = worker.load_weights.remote(self._weights_ref, self._version) if self._weights_ref is not None \
            else worker.version.remote()
        try:
            ray.get(ready, timeout=self.rollout_cfg.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(worker, no_restart=True)
            raise RolloutWorkerError(self._start_failure(1, "a replacement rollout worker")) from None
        self.workers[i] = worker
        if self._state is not None:
            failure = self._senders.send_all(self.workers, self._state, self._version, only=[i]).get(i)
            if failure is not None:
                raise RolloutWorkerError(f"a replacement rollout worker did not take the current weights through "
                                         f"its new transfer group: {failure}")

    def _counter(self, progress: ProgressFn) -> Any:
        if self._progress_counter is None:
            self._progress_counter = ray.remote(num_cpus=0)(EpisodeCounter).remote()
        # Waits for the actor's start on first use, so the first polls find it answering.
        ray.get(self._progress_counter.reset.remote(), timeout=self.rollout_cfg.start_timeout_s)
        return self._progress_counter

    def _read(self, counter: Any) -> tuple[int, int] | None:
        try:
            return ray.get(counter.snapshot.remote(), timeout=READ_TIMEOUT_S)
        except ray.exceptions.RayError:  # includes GetTimeoutError: a busy or lost counter skips one report
            return None

    def _execute(self, requests: list[RolloutRequest], poll: Callable[[], None] | None = None,
                 ) -> tuple[list[Episode], int]:
        restarts = 0
        timeout = self.rollout_cfg.call_timeout_s
        pending = {self.workers[i].run.remote(req): (i, time.monotonic() + timeout) for i, req in enumerate(requests)}
        results: dict[int, list[Episode]] = {}
        while pending:
            earliest = min(deadline for _, deadline in pending.values())
            wait_s = max(0.0, earliest - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s if poll is None else min(wait_s, POLL_S))
            if poll is not None:
                poll()
                if not ready and time.monotonic() < earliest:
                    continue  # nothing finished yet and nothing overdue: keep waiting
            if ready:
                ref = ready[0]
                i, _ = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    continue
                except ray.exceptions.RayActorError as exc:
                    failure = f"died ({exc})"
            else:  # the oldest call is past its deadline: that worker is stuck
                ref = next(r for r, (_, deadline) in pending.items() if deadline == earliest)
                i, _ = pending.pop(ref)
                failure = f"did not answer within rollout.call_timeout_s = {timeout:g} s"
            restarts += 1
            if restarts > self.rollout_cfg.max_restarts:
                # Replace the failed worker before giving up: a stuck actor left in the group would make the next
                # call queue behind its hung one.
                self._respawn(i)
                raise RolloutWorkerError(
                    f"rollout workers failed {restarts} times within one request (rollout.max_restarts = "
                    f"{self.rollout_cfg.max_restarts}); the last one {failure}. Check the actors' memory and logs "
                    "(a crashing or hanging env, an out-of-memory model), or raise rollout.max_restarts / "
                    "rollout.call_timeout_s.")
            self._respawn(i)
            pending[self.workers[i].run.remote(requests[i])] = (i, time.monotonic() + timeout)
        return [ep for i in sorted(results) for ep in results[i]], restarts

    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        if self.rollout_cfg.backend == "vllm":
            from opd_agents.rollout.weight_sync import WorkerSenders

            if self._senders is None:
                self._senders = WorkerSenders(self.rollout_cfg.weight_transfer, self.rollout_cfg.call_timeout_s,
                                              len(self.workers))
            self._state, self._version = state, version
            for i in self._senders.send_all(self.workers, state, version):
                self._respawn(i)  # a dead or stuck worker is replaced; its new engine gets these weights
            return
        ref = ray.put(state)
        self._weights_ref, self._version = ref, version
        refs = {w.load_weights.remote(ref, version): i for i, w in enumerate(self.workers)}
        deadline = time.monotonic() + self.rollout_cfg.call_timeout_s
        for r, i in refs.items():
            try:
                ray.get(r, timeout=max(0.0, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self._respawn(i)  # a dead or stuck worker is replaced and receives the new weights there

    def shutdown(self) -> None:
        if self._senders is not None:
            self._senders.close_all()
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self._progress_counter is not None:
            ray.kill(self._progress_counter, no_restart=True)
            self._progress_counter = None
