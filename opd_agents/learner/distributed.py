"""Data-parallel learner ranks in one `torch.distributed` group: replicated (`ddp`) or sharded (`fsdp`, FSDP2).

Each rank holds every sample of the rollout batch and trains on its share (greedy split by token count); the
loss normaliser is the GLOBAL masked-token count, so summing per-rank gradients gives exactly the gradient of
one big batch (a true global token-mean, not a mean of per-rank means):
- `ddp`: parameters replicated; gradients summed with one all-reduce per parameter after the micro-batches.
- `fsdp`: `fully_shard` on every decoder layer and on the loss module (over a (replicas, shards) mesh for HSDP
  with `learner.replicas`), with a mixed-precision policy (float32
  master shards, compute-dtype all-gathers, float32 gradient reduction); FSDP2 averages gradients over ranks, so each
  micro-batch loss is multiplied by the world size, and reduce-scatters them once, after a mini-batch's last
  micro-batch. Ranks run the same number of micro-batches (the short ones pad with zero-mask copies) because every
  forward all-gathers parameters.
Gradient clipping uses the global norm. Checkpoints: weights are gathered into one `save_pretrained` folder; under
fsdp each rank writes its optimizer shards (torch.distributed.checkpoint), which any number of ranks, or one
process, can resume from (DCP re-slices on load).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from opd_agents.config import Config
from opd_agents.learner.batching import micro_batches
from opd_agents.learner.learner import Learner, compute_copy
from opd_agents.learner.optim_state import OPTIM_DCP, fqns, index_to_fqn
from opd_agents.samples import Sample

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def process_group_backend(use_cuda: bool) -> str:
    """gloo on CPU; on CUDA, gloo for CPU tensors and nccl for CUDA ones, so no collective can get a tensor on a device
    its backend does not serve (NCCL raises on CPU tensors, e.g. the global token counts)."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def split_by_tokens(idx: list[int], lengths: list[int], world: int) -> list[list[int]]:
    """Deal sample indices to ranks, longest first, each to the rank with the fewest tokens (ties: lowest rank)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(idx, key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shares]


class DistributedLearner(Learner):
    """One rank of a data-parallel learner; `torch.distributed` must be initialised before construction."""

    def __init__(self, cfg: Config, model_path: str, strategy: str, adapter_path: str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedLearner needs torch.distributed.init_process_group first")
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"learner.strategy = {strategy!r}; choose 'ddp' or 'fsdp'")
        if strategy == "fsdp" and cfg.learner.lora is not None:
            raise ValueError("learner.lora is supported with learner.strategy=ddp (or one worker), not fsdp")
        if strategy == "fsdp" and cfg.fidelity.every:
            raise ValueError("fidelity.every (the signal-fidelity probe) reads the full LM head on one rank and "
                             "is supported with learner.strategy=ddp (or one worker), not fsdp; set it to 0")
        if cfg.loss.entropy_top_ratio is not None and cfg.loss.entropy_selection == "pooled":
            raise ValueError("loss.entropy_selection = 'pooled' selects tokens across the whole mini-batch and is not "
                             "supported with learner.num_workers > 1; use entropy_selection: per_sample (the paper's) "
                             "or one learner worker")
        self.strategy = strategy
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        super().__init__(cfg, model_path, adapter_path)

    def _wrap(self) -> None:
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # Shards hold the float32 master weights; each forward all-gathers them cast to the compute dtype, and
            # gradients are reduced in float32.
            policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            mesh = self._mesh()
            for layer in self.model.get_decoder().layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            # The loss module keeps its parameters unsharded from forward to backward: both lm_head paths read the
            # weight again in backward (the chunked full-vocabulary gather recomputes, the support logits re-gather
            # their rows) and need it there.
            fully_shard(self.scorer, mesh=mesh, reshard_after_forward=False, mp_policy=policy)

    def _mesh(self) -> Any:
        """FSDP2's device mesh: flat over every rank, or (replicas, ranks per replica) for HSDP — shard within a
        replica (a node's ranks, placed consecutively), replicate across replicas; gradients are reduce-scattered
        inside a replica, then all-reduced across replicas."""
        from torch.distributed.device_mesh import init_device_mesh

        replicas = self.cfg.learner.replicas
        if replicas == 1:
            return None
        shape, names = (replicas, self.world // replicas), ("replicate", "shard")
        return init_device_mesh(self.device.type, shape, mesh_dim_names=names)

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.strategy == "fsdp" else super()._compute()

    def _before_backward(self, last: bool) -> None:
        if self.strategy == "fsdp":  # reduce-scatter once per mini-batch, after its last micro-batch
            self.scorer.set_requires_gradient_sync(last)

    def _local_groups(self, idx: list[int], samples: list[Sample]) -> tuple[list[list[int]], int]:
        mine = split_by_tokens(idx, [len(s.input_ids) for s in samples], self.world)[self.rank]
        groups = micro_batches(mine, samples, self.cfg.optim.micro_batch_tokens)
        real = len(groups)
        if self.strategy == "fsdp":
            count = torch.tensor([real])
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            filler = groups[0] if groups else [idx[0]]
            groups = groups + [filler] * (int(count) - real)
        return groups, real

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def _reduce_grads(self) -> None:
        if self.strategy == "ddp":
            for p in self.model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    def _reduce_metrics(self, weighted: dict[str, float]) -> dict[str, float]:
        gathered: list[dict[str, float]] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, weighted)
        return {k: sum(g.get(k, 0.0) for g in gathered) for k in sorted({k for g in gathered for k in g})}

    @property
    def _loss_scale(self) -> float:
        return float(self.world) if self.strategy == "fsdp" else 1.0

    def student_topk_ids(self, samples: list[Sample], k: int) -> list[torch.Tensor]:
        if self.strategy == "fsdp":
            raise ValueError("loss.support=student_topk is not supported with learner.strategy=fsdp; use ddp")
        return super().student_topk_ids(samples, k)

    # ---- state: collective calls, every rank must make them ------------------------------------------------

    def master_state(self) -> dict[str, torch.Tensor]:
        """fsdp: the full float32 master parameters, gathered to CPU (every rank must call; checkpoints hold these)."""
        full = get_model_state_dict(self.scorer, options=_FULL)
        return {k.removeprefix("model."): v for k, v in full.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        """The full parameters in the compute dtype on rank 0 (an empty dict elsewhere)."""
        if self.strategy == "ddp":
            return super().weights() if self.rank == 0 else {}
        return {k: compute_copy(v, self.compute_dtype) for k, v in self.master_state().items()}

    def save_sharded_optimizer(self, folder: str | Path) -> None:
        """fsdp: every rank writes its optimizer shards to `<folder>/optimizer_dcp` (torch.distributed.checkpoint)."""
        dcp.save({"optim": get_optimizer_state_dict(self.scorer, self.optimizer)},
                 checkpoint_id=str(Path(folder) / OPTIM_DCP))

    def state(self) -> dict[str, Any]:
        """Trainer state; under fsdp the optimizer entry names the shards `save_sharded_optimizer` wrote."""
        base = super().state()
        if self.strategy == "fsdp":
            base["optimizer"] = {"dcp": OPTIM_DCP}
        return base

    def load_state(self, state: dict[str, Any], folder: str | Path | None = None) -> None:
        """Resume from a checkpoint written by any number of ranks (DCP shards) or by one process (full state)."""
        if self.strategy == "ddp":
            return super().load_state(state, folder)
        opt = state["optimizer"]
        if "dcp" in opt:
            if folder is None:
                raise ValueError("this checkpoint's optimizer state is sharded: pass its checkpoint folder")
            # The template (initialised optimizer state) tells DCP which slices this rank needs, whatever wrote them.
            target = {"optim": get_optimizer_state_dict(self.scorer, self.optimizer)}
            dcp.load(target, checkpoint_id=str(Path(folder) / opt["dcp"]))
            set_optimizer_state_dict(self.scorer, self.optimizer, target["optim"])
        else:  # one process wrote it: every rank reads it whole and keeps its shard
            set_optimizer_state_dict(self.scorer, self.optimizer, index_to_fqn(opt, fqns(self.scorer)),
                                     options=StateDictOptions(full_state_dict=True))
        self._load_counters(state)
        return None
