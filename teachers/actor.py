"""Any teacher backend run as its own Ray actor (`teachers.<name>.ray_actor: true`), and the client that calls it.

`TeacherActor` builds the configured backend inside the actor process, placed with the teacher's num_cpus /
num_gpus. `RemoteTeacher` is a `Teacher` with the same `topk` / `vocab` API. Start-up and calls have their own
bounds: every actor (the first and each replacement) gets `teachers.<name>.start_timeout_s` to build its backend (a
15 GB model may take minutes to load; it is never killed for that), then every call is a `ray.get` bounded by
`call_timeout_s`; a timed-out or dead actor is replaced and the call retried with exponential backoff, and after the
last attempt a `TeacherError` names the teacher, the task and the cause — a caller never hangs. Errors raised by the
backend itself (bad K, template mismatch, a failing start-up) are not retried: they would fail the same way again.
Results are `TeacherTopK` (topk_ids/topk_logprobs (N, K), sampled_logprobs (N,)) on CPU, one per sample.

Client settings from `teachers.<name>.options`, not passed on to the backend: `ray_max_attempts` (default 3),
`ray_backoff_s` (first retry delay, default 1, doubled each retry).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

from opd_agents.config import TeacherConfig
from opd_agents.samples import Sample, TeacherTopK
from teachers.batching import consecutive_batches
from teachers.registry import Teacher, build_teacher

# Defaults of the client options (declared with their types in teachers.registry.CLIENT_OPTIONS).
_CLIENT_OPTIONS = {"ray_max_attempts": 3, "ray_backoff_s": 1.0}
# Failures of the actor or its process (died, unreachable, OOM-killed, hung) — worth a fresh actor and a retry.
_RETRYABLE = (GetTimeoutError, RayActorError, WorkerCrashedError, OutOfMemoryError)


class TeacherError(RuntimeError):
    """A remote teacher call failed for good (after retries, or with a backend error)."""


@ray.remote
class TeacherActor:
    """Holds one backend; built from the backend config (ray_actor already cleared)."""

    def __init__(self, name: str, cfg: TeacherConfig) -> None:
        self.teacher = build_teacher(name, cfg)

    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        return self.teacher.topk(samples, k)

    def score(self, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        return self.teacher.score(samples, ids)

    def vocab(self) -> dict[str, int]:
        return self.teacher.vocab()

    def ready(self) -> bool:
        """Answers once the constructor (the backend's model load) has finished."""
        return True

    def close(self) -> None:
        self.teacher.close()


def split_options(cfg: TeacherConfig) -> tuple[dict[str, float], TeacherConfig]:
    """(client settings, the backend's own config without them and with ray_actor off)."""
    client = {key: float(cfg.options.get(key, default)) for key, default in _CLIENT_OPTIONS.items()}
    rest = {key: value for key, value in cfg.options.items() if key not in _CLIENT_OPTIONS}
    return client, cfg.model_copy(update={"options": rest, "ray_actor": False})


class RemoteTeacher(Teacher):
    """Client of a `TeacherActor`; errors name the task of the samples in the call, else `task` if given."""

    def __init__(self, name: str, cfg: TeacherConfig, task: str | None = None) -> None:
        super().__init__(name, cfg)
        if not ray.is_initialized():
            raise TeacherError(f"teacher {name!r} is configured with ray_actor: true but Ray is not initialised; "
                               "call ray.init() (the trainer does) before building teachers")
        settings, self.backend_cfg = split_options(cfg)
        self.timeout_s = cfg.call_timeout_s
        self.max_attempts = max(1, int(settings["ray_max_attempts"]))
        self.backoff_s = settings["ray_backoff_s"]
        self.task = task
        self.actor: Any = None
        self._start()

    def _start(self) -> None:
        """Start an actor and wait, up to start_timeout_s, until its backend is built."""
        self.actor = TeacherActor.options(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus).remote(
            self.name, self.backend_cfg)
        where = f"teacher {self.name!r}" + (f" (task {self.task!r})" if self.task else "")
        try:
            ray.get(self.actor.ready.remote(), timeout=self.cfg.start_timeout_s)
        except GetTimeoutError:
            ray.kill(self.actor)
            raise TeacherError(
                f"{where}: its Ray actor did not start within teachers.{self.name}.start_timeout_s = "
                f"{self.cfg.start_timeout_s:g} s (loading the model, or waiting for num_cpus={self.cfg.num_cpus:g} / "
                f"num_gpus={self.cfg.num_gpus:g} the cluster cannot give). Raise start_timeout_s, pass a local model "
                "folder instead of a hub id, or free the resources") from None
        except (RayActorError, RayTaskError) as exc:
            raise TeacherError(f"{where}: its Ray actor failed to start: {exc}") from exc

    def _drop_actor(self) -> None:
        """Kill a stuck or dead actor so nothing queues behind it; the next attempt starts a fresh one."""
        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 — the actor may already be gone
            pass
        self.actor = None

    def _call(self, what: str, method: Callable[[Any], Any], task: str | None = None) -> Any:
        task = task or self.task
        where = f"teacher {self.name!r}" + (f" (task {task!r})" if task else "")
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            if self.actor is None:
                self._start()
            try:
                return ray.get(method(self.actor), timeout=self.timeout_s)
            except RayTaskError as exc:
                raise TeacherError(f"{where}: {what} failed inside the actor: {exc.cause!r}") from exc
            except _RETRYABLE as exc:
                last = exc
                self._drop_actor()
        raise TeacherError(
            f"{where}: {what} failed {self.max_attempts} times (timeout {self.timeout_s:g}s each); last error: "
            f"{type(last).__name__}: {last}. Check the actor's log, its resources (num_cpus/num_gpus), or raise "
            f"teachers.{self.name}.call_timeout_s / options.ray_max_attempts")

    def _batches(self, samples: list[Sample]) -> list[list[int]]:
        """Consecutive sample indices per call: at most `call_tokens` tokens each, so a step of any size is several
        calls that each finish well inside call_timeout_s (and a retry redoes one of them, not the step)."""
        return consecutive_batches([len(s.input_ids) for s in samples], self.cfg.call_tokens)

    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        # A teacher may serve several tasks: the samples say which one this call is for.
        task = samples[0].task if samples else None
        out: list[TeacherTopK] = []
        for batch in self._batches(samples):
            part = [samples[i] for i in batch]
            out += self._call("topk", lambda actor, part=part: actor.topk.remote(part, k), task)
        return out

    def score(self, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        task = samples[0].task if samples else None
        out: list[TeacherTopK] = []
        for batch in self._batches(samples):
            part, part_ids = [samples[i] for i in batch], [ids[i] for i in batch]
            out += self._call("score", lambda actor, p=part, q=part_ids: actor.score.remote(p, q), task)
        return out

    def vocab(self) -> dict[str, int]:
        return self._call("vocab", lambda actor: actor.vocab.remote())

    def close(self) -> None:
        if self.actor is not None:
            try:
                ray.get(self.actor.close.remote(), timeout=min(self.timeout_s, 30.0))
            except Exception:  # noqa: BLE001 — closing a dead or stuck actor: killing it below is enough
                pass
            ray.kill(self.actor)
            self.actor = None
