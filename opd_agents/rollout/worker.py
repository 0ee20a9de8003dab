"""`RolloutWorker`: one student replica plus a pool of Gymnasium envs per task; runs `RolloutRequest`s.

The same class runs in-process (LocalRolloutGroup) or as a Ray actor (RolloutGroup wraps it with
`ray.remote`). On construction it imports `envs` and the run's `imports`, so environments registered by
user modules exist inside the actor process too. Envs are made with `gymnasium.make(env_id, **kwargs)` per (task,
train|eval), as many as a request keeps in flight (`rollout.max_concurrent_episodes`; by default every episode of
the request, so nothing runs in waves), and reused across requests.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import gymnasium
import torch

from envs.adapter import PromptAdapter, get_adapter
from opd_agents.config import ModelConfig, RolloutConfig, TaskConfig
from opd_agents.devices import worker_device
from opd_agents.rollout.backends import build_policy
from opd_agents.rollout.chat import ChatEncoder
from opd_agents.rollout.episode import Episode, run_episodes
from opd_agents.rollout.loading import load_tokenizer
from opd_agents.rollout.progress import episode_hook
from opd_agents.rollout.request import RolloutRequest

# vLLM's `VLLMWeightSyncClient` calls, as the vLLM policy implements them.
TRANSFER_CALLS = frozenset({"init_weight_transfer_engine", "start_weight_update", "update_weights",
                            "finish_weight_update"})


class WeightVersionError(RuntimeError):
    """A request expected different weights than the worker holds."""


def import_modules(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"rollout worker cannot import {name!r} (run.imports): {exc}") from exc


def env_kwargs(task: TaskConfig, evaluation: bool) -> dict:
    return {**task.env_kwargs, **task.eval_env_kwargs} if evaluation else dict(task.env_kwargs)


class RolloutWorker:
    """A student policy replica and its env pools."""

    def __init__(self, student: ModelConfig, rollout: RolloutConfig, *, imports: Sequence[str] = (),
                 seed: int = 0) -> None:
        import_modules(["envs", *imports])
        device = str(worker_device(rollout.num_gpus_per_worker))
        if device == "cpu" and rollout.num_cpus_per_worker >= 1:
            # Several actors share the machine: one intra-op pool per actor, sized to its CPU share.
            torch.set_num_threads(int(rollout.num_cpus_per_worker))
        self.rollout = rollout
        self.tokenizer = load_tokenizer(student)
        self.encoder = ChatEncoder(self.tokenizer)
        self.policy = build_policy(student, rollout, self.tokenizer, device=device, seed=seed)
        self.pools: dict[tuple[str, bool], list[tuple[gymnasium.Env, PromptAdapter]]] = {}

    def version(self) -> int:
        return self.policy.version

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.policy.load_state_dict(state, version)
        return self.policy.version

    def weight_transfer(self, method: str, *args: Any) -> int:
        """One call of vLLM's weight-sync control plane (`TRANSFER_CALLS`) on this worker's vLLM policy, made by the
        group's sender in the driver; returns the policy's weight version."""
        if method not in TRANSFER_CALLS:
            raise ValueError(f"{method!r} is not a weight-transfer call; expected one of {sorted(TRANSFER_CALLS)}.")
        getattr(self._transfer_policy(), method)(*args)
        return self.policy.version

    def engine_ranks(self) -> int:
        """The vLLM engine's worker processes (the ranks its transfer group adds)."""
        return int(self._transfer_policy().engine_ranks)

    def _transfer_policy(self) -> Any:
        if not hasattr(self.policy, "engine_ranks"):
            raise TypeError(f"rollout.backend = {self.rollout.backend!r} has no weight-transfer engine; only the "
                            "vllm backend is synced through one.")
        return self.policy

    def _pool(self, task: TaskConfig, evaluation: bool, size: int) -> list[tuple[gymnasium.Env, PromptAdapter]]:
        """At least `size` envs of the task (train or eval kwargs); the pool grows as requests need and is reused."""
        if task.env_id not in gymnasium.registry:
            raise KeyError(f"env id {task.env_id!r} (task {task.name!r}) is not registered in the rollout worker; "
                           "add the module that registers it to run.imports.")
        pool = self.pools.setdefault((task.name, evaluation), [])
        kwargs = env_kwargs(task, evaluation)
        while len(pool) < size:
            env = gymnasium.make(task.env_id, **kwargs)
            pool.append((env, get_adapter(env)))
        return pool

    def concurrency(self, episodes: int) -> int:
        """Episodes in flight for a request of `episodes`: all of them, or `rollout.max_concurrent_episodes`."""
        cap = self.rollout.max_concurrent_episodes
        return max(1, episodes if cap is None else min(cap, episodes))

    def run(self, request: RolloutRequest) -> list[Episode]:
        if request.version != self.policy.version:
            raise WeightVersionError(
                f"rollout request expects weight version {request.version} but this worker holds "
                f"{self.policy.version}; call group.sync_weights(state_dict, version) before rolling out.")
        task = request.task
        in_flight = self.concurrency(len(request.specs))
        envs = self._pool(task, request.evaluation, in_flight)[:in_flight]
        return run_episodes(request.specs, envs, self.policy, self.encoder,
                            request.params, task=task.name, sample_mode=task.sample_mode,
                            max_turns=task.max_turns, seed=request.seed, on_done=episode_hook(request.counter))

    def close(self) -> None:
        for pool in self.pools.values():
            for env, _ in pool:
                env.close()
        self.pools.clear()
