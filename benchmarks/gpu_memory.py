"""The GPU check's learner-memory items (issue 40): the memory plan against the device, the float32 masters against
pure bf16, and the process group's collectives as the learner ranks run them. Imported by `gpu_check.py`.

- `check_memory`: a Qwen2.5-7B-shaped model cut to a few layers (the real V = 152,064 and H = 3,584 on the device) in
  a `Learner` with bf16 compute: per token length and with / without activation checkpointing, the bytes a training
  forward keeps (`torch.cuda.memory_allocated` after the forward, minus before) against the plan's activation model,
  and one update's `torch.cuda.max_memory_allocated` against the plan's whole learner estimate.
- `check_precision`: one AdamW step at lr 1e-6 of the same model: the fraction of parameters changed and the mean |Δw|
  with float32 masters (the Learner) against pure bf16 weights and optimizer state.
- `check_collectives`: a one-rank process group on the learner's backend (`cpu:gloo,cuda:nccl` on CUDA) running a
  `DistributedLearner` (fsdp) update: FSDP2's all-gathers and reduce-scatters, the CPU token counts of
  `_global_sum`, the padding count and the metrics' `all_gather_object`; and the failure the plain `nccl` backend
  gives a CPU tensor, which is why the learner does not use it.

On the CPU (`--small`) the same lines run at tiny sizes; memory is then not measured (None), and the collectives run
on gloo.
"""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.config import Config, LossConfig, ModelConfig, OptimConfig, RunConfig, TaskConfig, TeacherConfig
from opd_agents.learner.learner import Learner
from opd_agents.run.memory_plan import ModelShape, forward_saved_bytes, learner_terms
from opd_agents.samples import Sample, TeacherTopK
from opd_agents.zoo.models import TinySize

GIB = float(1 << 30)
LR = 1e-6
# The plan's activation model is fitted to saved-tensor bytes (15% on CPU); a whole update's peak also holds the
# allocator's rounding and the loss's transient buffers.
TOL = {"memory": {"max_activation_rel": 0.15, "max_plan_rel": 0.25}, "precision": {"norm_gains_changed": 1.0}}


def cut_7b(layers: int) -> TinySize:
    """Qwen2.5-7B's layer shape (H 3,584, 28 heads, 4 KV heads, I 18,944) with `layers` layers."""
    return TinySize(layers, 3584, 28, 4, 18944, 32768)


def _config(model: Path, device: str, checkpointing: bool, tokens: int) -> Config:
    return Config(run=RunConfig(device=device, steps=1), student=ModelConfig(path=str(model), dtype="bfloat16"),
                  teachers={"t": TeacherConfig(model=str(model))},
                  tasks=[TaskConfig(name="gpu_check", env_id="opd/Math-v0", teacher="t")],
                  loss=LossConfig(k=32, chunk_size=min(1024, tokens)),
                  optim=OptimConfig(lr=LR, micro_batch_tokens=tokens),
                  learner={"gradient_checkpointing": checkpointing})


def _batch(tokens: int, vocab: int, seed: int = 0) -> tuple[list[Sample], list[TeacherTopK]]:
    """One sample of `tokens` tokens (the second half is the response) and a random top-32 per loss row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=g).tolist()
    half = tokens // 2
    sample = Sample(ids, [0] * half + [1] * (tokens - half), [0.0] * half + [-1.0] * (tokens - half), task="gpu_check")
    n = sample.num_loss_tokens
    top = torch.rand(n, vocab, generator=g).topk(32, dim=-1).indices
    logprobs = torch.log_softmax(torch.randn(n, 32, generator=g), -1).sort(-1, descending=True).values
    return [sample], [TeacherTopK(top, logprobs, logprobs[:, 0])]


def _shape(model: PreTrainedModel) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def check_memory(folder: Path, model: PreTrainedModel, tokens: tuple[int, ...], device: torch.device,
                 ) -> tuple[dict[str, Any], None]:
    cuda = device.type == "cuda"
    shape, cases = _shape(model), []
    for checkpointing in (False, True):
        for T in tokens:
            learner = Learner(_config(folder, device.type, checkpointing, T), str(folder))
            samples, outs = _batch(T, shape.vocab)
            mb = learner._collate(samples, outs)
            estimate_fw = forward_saved_bytes(shape, T, 2, 4, checkpointing)
            kept = None
            if cuda:
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
            rows = learner._student_rows(mb, mb.support_ids)
            if cuda:
                torch.cuda.synchronize(device)
                kept = torch.cuda.memory_allocated(device) - before
            del rows
            learner.optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            learner.update(samples, outs)
            peak = torch.cuda.max_memory_allocated(device) if cuda else None
            plan = sum(learner_terms(learner.cfg, shape, 1, T).values())
            cases.append({"tokens": T, "checkpointing": checkpointing, "forward_kept_gib": kept and kept / GIB,
                          "plan_activations_gib": estimate_fw / GIB,
                          "activation_rel": None if kept is None else abs(kept - estimate_fw) / estimate_fw,
                          "update_peak_gib": peak and peak / GIB, "plan_learner_gib": plan / GIB,
                          "plan_rel": None if peak is None else abs(peak - plan) / plan})
            del learner
            if cuda:
                torch.cuda.empty_cache()
    measured = [c for c in cases if c["activation_rel"] is not None]
    tol = TOL["memory"]
    result = {"layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab, "cases": cases, "tolerance": tol,
              "max_activation_rel": max((c["activation_rel"] for c in measured), default=None),
              "max_plan_rel": max((c["plan_rel"] for c in measured), default=None)}
    result["passed"] = all(c["activation_rel"] <= tol["max_activation_rel"] and c["plan_rel"] <= tol["max_plan_rel"]
                           for c in measured)
    return result, None


def check_precision(folder: Path, model: PreTrainedModel, device: torch.device) -> tuple[dict[str, Any], None]:
    """One step at lr 1e-6 on the same gradient: float32 masters (the Learner, bf16 compute) vs pure bf16 AdamW."""
    shape = _shape(model)
    samples, outs = _batch(64, shape.vocab)
    learner = Learner(_config(folder, device.type, False, 64), str(folder))
    start = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.update(samples, outs)
    master = {n: (p.detach() - start[n]).double() for n, p in learner.model.named_parameters()}
    # Pure bf16: the same gradient (the Learner's, in bf16) applied by AdamW to bf16 weights with bf16 state.
    pure = copy.deepcopy(learner.model).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in pure.named_parameters():
            p.copy_(start[n].to(torch.bfloat16))
            grad = learner.model.get_parameter(n).grad
            p.grad = None if grad is None else grad.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in pure.named_parameters()}
    torch.optim.AdamW(pure.parameters(), lr=LR, weight_decay=0.0).step()
    bf16 = {n: (p.detach() - before[n]).double() for n, p in pure.named_parameters()}

    def stats(delta: dict[str, torch.Tensor]) -> dict[str, float]:
        n = sum(d.numel() for d in delta.values())
        gains = [d for k, d in delta.items() if "norm" in k]
        return {"changed": sum(int((d != 0).sum()) for d in delta.values()) / n,
                "mean_abs_dw": float(sum(d.abs().sum() for d in delta.values()) / n),
                "norm_gains_changed": sum(int((d != 0).sum()) for d in gains) / sum(d.numel() for d in gains)}

    result = {"lr": LR, "fp32_master": stats(master), "pure_bf16": stats(bf16), "tolerance": TOL["precision"]}
    result["norm_gains_changed"] = result["fp32_master"]["norm_gains_changed"]
    result["passed"] = result["norm_gains_changed"] >= TOL["precision"]["norm_gains_changed"]
    return result, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_collectives(folder: Path, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                      ) -> tuple[dict[str, Any], None]:
    import torch.distributed as dist

    from opd_agents.learner.distributed import DistributedLearner, process_group_backend

    cuda = device.type == "cuda"
    backend = process_group_backend(cuda)
    result: dict[str, Any] = {"backend": backend, "tolerance": {}}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if cuda:  # what the old code did: a plain nccl group, then a CPU tensor in a collective
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            dist.all_reduce(torch.ones(1))
            result["plain_nccl_cpu_tensor"] = "no error"
        except Exception as exc:  # the expected failure, recorded
            result["plain_nccl_cpu_tensor"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        shape_vocab = tokenizer.vocab_size
        samples, outs = _batch(64, shape_vocab)
        cfg = _config(folder, device.type, cuda, 64)
        cfg.learner.strategy = "fsdp"
        learner = DistributedLearner(cfg, str(folder), "fsdp")
        metrics = learner.update(samples, outs)
        result |= {"update_loss": metrics["loss"], "global_sum": learner._global_sum([1.0, 2.0]),
                   "weights_dtype": str(next(iter(learner.weights().values())).dtype)}
        result["passed"] = result["global_sum"] == [1.0, 2.0] and metrics["skipped"] == 0.0
    finally:
        dist.destroy_process_group()
    return result, None
