"""A `gloo` weight-transfer engine for vLLM 0.32: CPU tensors broadcast over a torch.distributed gloo group into the
engine's workers, loaded with vLLM's layerwise reload (the load the built-in `nccl` engine uses).

vLLM's built-in `nccl` and `ipc` engines need CUDA on both sides; this one runs on vLLM's CPU build and carries the
learner's CPU tensors to CUDA engines too (gloo moves host memory; `load_weights` copies into the device parameters).
It plugs into vLLM's own registries: importing this module registers backend "gloo" in `WeightTransferEngineFactory`
(worker side) and `WeightTransferTrainerFactory` (trainer side). vLLM imports the module named by
`worker_extension_cls` in every worker before `Worker.load_model` creates the worker's engine, so naming
`WorkerRegistration` there makes the backend exist in each worker process.

Group: rank 0 is the trainer (the one process holding the full weights); the engine's workers are ranks
`rank_offset + dp_rank * world_size + rank` (vLLM's rule for the nccl engine). The group is a stateless gloo
`ProcessGroup` (vLLM's `stateless_init_torch_distributed_process_group`), so it leaves the workers' own
torch.distributed state alone; the trainer binds the rendezvous socket itself (port chosen free by the OS, no race).
Every receive, send and rendezvous waits at most `timeout_s`.

One sync: `start_weight_update` (layerwise reload set up), `update_weights(names, dtype_names, shapes)` on the
workers while the trainer broadcasts each tensor (shape as declared, any dtype) in that order, then
`finish_weight_update` (the layerwise reload finalised).
"""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch.distributed import ProcessGroup
from vllm.config.weight_transfer import WeightTransferConfig
from vllm.distributed.utils import (
    stateless_destroy_torch_distributed_process_group,
    stateless_init_torch_distributed_process_group,
)
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

if TYPE_CHECKING:
    from vllm.config import VllmConfig

BACKEND = "gloo"


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """What a worker needs to join the trainer's group (sent through `init_weight_transfer_engine`)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's side of the group: its address (reachable from every engine worker), the group size (1 + the
    engine's workers) and the bound on every wait. The port is picked free when the trainer binds."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    world_size: int
    timeout_s: float


def _join(address: str, port: int, rank: int, world_size: int, timeout_s: float,
          listen: socket.socket | None = None) -> ProcessGroup:
    return stateless_init_torch_distributed_process_group(
        address, port, rank, world_size, "gloo", listen_socket=listen, timeout=timedelta(seconds=timeout_s))


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, NCCLWeightTransferUpdateInfo]):
    """Worker side: receives each tensor by gloo broadcast from rank 0 and loads it through the layerwise reload.

    The update info is vLLM's `NCCLWeightTransferUpdateInfo` (names, dtype names, shapes, length-checked): the
    dense transfer's metadata, which this engine needs unchanged."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo

    def __init__(self, config: WeightTransferConfig, vllm_config: VllmConfig, device: torch.device,
                 model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: ProcessGroup | None = None
        self.timeout = timedelta(seconds=0)

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        if self.group is not None:  # a trainer re-forming the group (e.g. a restarted driver) replaces the old one
            self.shutdown()
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.timeout = timedelta(seconds=init_info.timeout_s)
        self.group = _join(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                           init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # vLLM's base `update_weights` ends with `torch.accelerator.synchronize()`, which raises on a host without an
        # accelerator ("Cannot access accelerator device when none is available"). gloo receives synchronously into
        # host memory, so only a CUDA model's host-to-device copies in `load_weights` are left to wait for.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        """One fresh host tensor per name, filled by the broadcast (the layerwise loader keeps it until its layer is
        complete, so buffers are never reused). The next tensor's receive is posted before this one is loaded, so
        gloo's thread receives while this thread loads (one tensor in flight)."""
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first.")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        specs = list(zip(update_info.names, update_info.dtype_names, update_info.shapes))
        pending = self._post(*specs[0][1:]) if specs else None
        with disable_mtp_completeness_check():
            for i, (name, _, _) in enumerate(specs):
                tensor, work = pending
                work.wait(self.timeout)
                pending = self._post(*specs[i + 1][1:]) if i + 1 < len(specs) else None
                self.model.load_weights([(name, tensor)])

    def _post(self, dtype_name: str, shape: list[int]) -> tuple[torch.Tensor, Any]:
        """A fresh tensor of `shape` and the broadcast (from rank 0) that fills it, started."""
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{dtype_name!r} is not a torch dtype name (update info from the trainer).")
        assert self.group is not None
        tensor = torch.empty(shape, dtype=dtype)
        return tensor, self.group.broadcast(tensor, 0)

    def shutdown(self) -> None:
        if self.group is not None:
            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


def _checked(source: WeightSource, names: list[str]):
    """The source's tensors, each checked against the name announced to the workers at its position."""
    sent = 0
    for name, tensor in source:
        if sent >= len(names) or name != names[sent]:
            expected = names[sent] if sent < len(names) else "nothing more"
            raise ValueError(f"WeightSource yielded {name!r} at position {sent} where metadata() declared "
                             f"{expected!r}: both must list the same tensors in the same order.")
        sent += 1
        yield tensor
    if sent != len(names):
        raise ValueError(f"WeightSource yielded {sent} tensors but metadata() declared {len(names)}.")


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side (rank 0): forms the group with the engine's workers and broadcasts the source each sync."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool,
                 timeout_s: float) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.timeout_s = timeout_s
        self.group: ProcessGroup | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError("the gloo trainer weight transfer needs a WeightSource.")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, timeout_s=init_info.timeout_s)
        if not engine.is_sender:
            return engine  # one process sends; other trainer ranks hold no group and drive no RPC
        listen = socket.create_server((init_info.master_address, 0))
        port = listen.getsockname()[1]
        worker_info = GlooWeightTransferInitInfo(init_info.master_address, port, 1, init_info.world_size,
                                                 init_info.timeout_s)
        # The workers block in init_weight_transfer_engine until every rank has joined: run it beside our join.
        with ThreadPoolExecutor(max_workers=1) as exe:
            joined = exe.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = _join(init_info.master_address, port, 0, init_info.world_size, init_info.timeout_s,
                                 listen)
            joined.result(timeout=init_info.timeout_s)
        return engine

    def send_weights(self) -> None:
        assert self.source is not None  # trainer_init requires it
        if not self.is_sender:
            return
        if self.group is None:
            raise RuntimeError("gloo trainer transfer has no group: it was shut down or never formed.")
        meta = self.source.metadata()
        info = NCCLWeightTransferUpdateInfo(names=[m.name for m in meta],
                                            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        timeout = timedelta(seconds=self.timeout_s)
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            receiving = exe.submit(self.client.update_weights, asdict(info))
            for tensor in _checked(self.source, info.names):
                self.group.broadcast(tensor.contiguous(), 0).wait(timeout)
            receiving.result(timeout=self.timeout_s)
        finally:
            # Never join the RPC thread after a failed broadcast: the workers time out of their receive on their own
            # (gloo's timeout), and the group is unusable either way; the caller shuts it down.
            exe.shutdown(wait=False)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


class WorkerRegistration:
    """Named by `worker_extension_cls`: vLLM imports this module in each worker before it creates the worker's
    weight-transfer engine, which registers the gloo backend there. It adds no worker method."""


WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)
