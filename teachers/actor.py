"""Any teacher backend run as its own Ray actor (`teachers.<name>.ray_actor: true`), and the client that calls it.

`TeacherActor` builds the configured backend inside the actor process, placed with the teacher's num_cpus /
num_gpus. `RemoteTeacher` is a `Teacher` with the same `topk` / `vocab` API: every call is a `ray.get` with a
timeout; a timed-out or dead actor is replaced and the call retried with exponential backoff, and after the last
attempt a `TeacherError` names the teacher, the task and the cause — a caller never hangs. Errors raised by the
backend itself (bad K, template mismatch) are not retried: they would fail the same way again.
Results are `TeacherTopK` (topk_ids/topk_logprobs (N, K), sampled_logprobs (N,)) on CPU, one per sample.

Client settings come from `teachers.<name>.options` and are not passed on to the backend:
`ray_timeout_s` (default 600), `ray_max_attempts` (default 3), `ray_backoff_s` (first retry delay, default 1, doubled
each retry).
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
from teachers.registry import Teacher, build_teacher

# Defaults of the client options (declared with their types in teachers.registry.CLIENT_OPTIONS).
_CLIENT_OPTIONS = {"ray_timeout_s": 600.0, "ray_max_attempts": 3, "ray_backoff_s": 1.0}
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
        self.timeout_s = settings["ray_timeout_s"]
        self.max_attempts = max(1, int(settings["ray_max_attempts"]))
        self.backoff_s = settings["ray_backoff_s"]
        self.task = task
        self.actor: Any = None
        self._start()

    def _start(self) -> None:
        self.actor = TeacherActor.options(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus).remote(
            self.name, self.backend_cfg)

    def _replace_actor(self) -> None:
        """Kill a stuck or dead actor so a retry is not queued behind it, and start a fresh one."""
        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 — the actor may already be gone; a fresh one is started either way
            pass
        self._start()

    def _call(self, what: str, method: Callable[[Any], Any], task: str | None = None) -> Any:
        task = task or self.task
        where = f"teacher {self.name!r}" + (f" (task {task!r})" if task else "")
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return ray.get(method(self.actor), timeout=self.timeout_s)
            except RayTaskError as exc:
                raise TeacherError(f"{where}: {what} failed inside the actor: {exc.cause!r}") from exc
            except _RETRYABLE as exc:
                last = exc
                self._replace_actor()
        raise TeacherError(
            f"{where}: {what} failed {self.max_attempts} times (timeout {self.timeout_s:g}s each); last error: "
            f"{type(last).__name__}: {last}. Check the actor's log, its resources (num_cpus/num_gpus), or raise "
            f"teachers.{self.name}.options.ray_timeout_s / ray_max_attempts")

    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        # A teacher may serve several tasks: the samples say which one this call is for.
        task = samples[0].task if samples else None
        return self._call("topk", lambda actor: actor.topk.remote(samples, k), task)

    def score(self, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        task = samples[0].task if samples else None
        return self._call("score", lambda actor: actor.score.remote(samples, ids), task)

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
