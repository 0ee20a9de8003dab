"""The trainer side of vLLM weight sync: one transfer group per vLLM engine, formed and fed through vLLM's
weight-transfer API (`WeightTransferTrainerFactory.trainer_init`, then per sync `send_weights`).

Engines (`rollout.weight_transfer`, resolved by `vllm_policy.transfer_backend`): `gloo` (gloo_transfer.py: host
tensors over TCP, any platform) or `nccl` (vLLM's built-in engine: an NCCL broadcast from this process's GPU into the
engine's GPUs, `NCCLTrainerInitInfo`). Both take the same call sequence here; the nccl one has not run (no GPU
machine here has vLLM installed).

The sender is the process that holds the learner's weights as CPU tensors (HF names, compute dtype): the trainer's
driver (RolloutGroup, through `WorkerSenders` and each actor's `ActorClient`) or the rollout process itself
(VLLMPolicy.load_state_dict). Each tensor goes from that memory into the group (nccl: copied to the GPU one tensor at
a time); no file, no object store.

Versions: vLLM's trainer engines call `client.finish_weight_update()` without a version, so `CommittingClient`
commits the version the sender set for this sync.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
)
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
from vllm.utils.network_utils import get_ip, get_open_port

from opd_agents.rollout import gloo_transfer


class StateDictSource(WeightSource):
    """The weights of the current sync, `state` (HF name -> tensor, any device), yielded on `device` one tensor at
    a time (the nccl engine sends from the GPU; gloo from host memory)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state: dict[str, torch.Tensor] = {}

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.state.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.state.items():
            yield name, tensor.detach().to(self.device)


class CommittingClient:
    """A `VLLMWeightSyncClient` that commits `version` at `finish_weight_update` whoever calls it (vLLM's trainer
    engines pass none)."""

    def __init__(self, client: VLLMWeightSyncClient) -> None:
        self.client = client
        self.version: str | None = None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.client.start_weight_update()

    def update_weights(self, update_info: Any) -> None:
        self.client.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.finish_weight_update(self.version if weight_version is None else weight_version)


def _init_info(backend: str, world_size: int, timeout_s: float) -> Any:
    if backend == "gloo":
        return gloo_transfer.GlooTrainerInitInfo(rank=0, master_address=get_ip(), world_size=world_size,
                                                 timeout_s=timeout_s)
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    # Not run here (no GPU machine has vLLM). vLLM opens the NCCL rendezvous on a port it is handed, so the port is
    # picked free just before (vLLM's get_open_port); NCCL's store waits at most vLLM's own store timeout.
    return NCCLTrainerInitInfo(rank=0, master_address=get_ip(), master_port=get_open_port(), world_size=world_size)


def sending_device(backend: str) -> torch.device:
    """Where a sender stages its tensors: nccl, the calling thread's current CUDA device (call it in the thread that
    owns the GPU: the current device is per thread, and a fresh thread's is GPU 0); gloo, host memory."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class WeightSender:
    """The sending end of one vLLM engine's transfer group: formed on construction (the engine's workers join
    through `client`), then `send(state, version)` per sync. `engine_ranks` = the engine's worker processes;
    `device` = where tensors are staged (`sending_device`)."""

    def __init__(self, client: VLLMWeightSyncClient, backend: str, engine_ranks: int,
                 timeout_s: float, device: torch.device) -> None:
        self.client = CommittingClient(client)
        self.source = StateDictSource(device)
        self.engine: TrainerWeightTransferEngine = WeightTransferTrainerFactory.trainer_init(
            _init_info(backend, 1 + engine_ranks, timeout_s), client=self.client, source=self.source)

    def send(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Broadcast `state` into the engine and commit `version` there (its samples then carry it)."""
        self.source.state, self.client.version = state, str(version)
        try:
            self.engine.send_weights()
        finally:
            self.source.state = {}  # hold no reference to the learner's tensors between syncs

    def close(self) -> None:
        self.engine.shutdown()


class ActorClient:
    """The weight-sync control plane of a `RolloutWorker` Ray actor's vLLM policy, each call bounded by
    `timeout_s` (a dead actor raises `RayActorError`, a stuck one `GetTimeoutError`)."""

    def __init__(self, actor: Any, timeout_s: float) -> None:
        self.actor, self.timeout_s = actor, timeout_s

    def _call(self, method: str, *args: Any) -> None:
        ray.get(self.actor.weight_transfer.remote(method, *args), timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info: Any) -> None:
        self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update", weight_version)


# How a send into a worker's engine fails when the worker or its engine dies or hangs: Ray (a dead actor, an error
# inside it, a call past its timeout), gloo (a RuntimeError: "Connection closed by peer", a wait past its timeout),
# a thread past the sync's deadline.
TRANSFER_FAILURES = (ray.exceptions.RayError, RuntimeError, TimeoutError)


class WorkerSenders:
    """One `WeightSender` per worker slot of a RolloutGroup (`slots` RolloutWorker actors): a slot's transfer group is
    formed on its first send, and closed when its worker is replaced."""

    def __init__(self, backend: str, timeout_s: float, slots: int) -> None:
        self.backend, self.timeout_s = backend, timeout_s
        self.device = sending_device(backend)  # here, in the thread that made the group: its GPU
        self.senders: list[WeightSender | None] = [None] * slots

    def _send(self, i: int, worker: Any, state: dict[str, torch.Tensor], version: int) -> None:
        if self.senders[i] is None:
            ranks = ray.get(worker.engine_ranks.remote(), timeout=self.timeout_s)
            self.senders[i] = WeightSender(ActorClient(worker, self.timeout_s), self.backend, ranks, self.timeout_s,
                                           self.device)
        self.senders[i].send(state, version)

    def send_all(self, workers: Sequence[Any], state: dict[str, torch.Tensor], version: int,
                 only: Sequence[int] | None = None) -> dict[int, str]:
        """Send `state` to the workers at once (all, or the slots `only`), one thread per transfer group; the slots
        whose send failed (`TRANSFER_FAILURES`) or did not end within `timeout_s`, with what went wrong."""
        slots = range(len(workers)) if only is None else only
        # nccl: one engine at a time. Each send stages its tensors on this process's GPU (vLLM's packed broadcast:
        # two buffers in flight), so concurrent sends would stage one set per engine (the memory plan counts one).
        exe = ThreadPoolExecutor(max_workers=1 if self.backend == "nccl" else len(slots))
        sends = {i: exe.submit(self._send, i, workers[i], state, version) for i in slots}
        deadline = time.monotonic() + self.timeout_s
        failed = {}
        try:
            for i, send in sends.items():
                try:
                    send.result(timeout=max(0.0, deadline - time.monotonic()))
                except TRANSFER_FAILURES as exc:
                    failed[i] = repr(exc)
        finally:
            # A send past its deadline is not joined: replacing its worker breaks its group, which ends it.
            exe.shutdown(wait=False)
        return failed

    def close(self, i: int) -> None:
        sender, self.senders[i] = self.senders[i], None
        if sender is not None:
            sender.close()

    def close_all(self) -> None:
        for i in range(len(self.senders)):
            self.close(i)
