"""The learner: the student model, its optimizer, and one OPD update over a rollout batch.

`Learner.update(samples, teacher_outputs)` splits the batch into mini-batches (one optimizer step each, the paper's
128 / 64 = two steps per rollout batch) and each mini-batch into micro-batches by token budget (gradient
accumulation). The micro-batch tensors come from `batching.py`, the student's rows from `student.py`, and the loss
from the registry (`registry.py`, by `loss.name`); aggregation is a true token-mean over the mini-batch (the global
masked-token count is the normaliser of every micro-batch). A loss whose spec asks for old log-probs (sampled-token
OPD with `loss.old_logprob: recomputed`) and `loss.entropy_selection: per_sample` read one no-grad pass over the
update's micro-batches before its first optimizer step: the student's log-prob of each sampled token and its entropy
(PPO's old policy, as verl's `compute_log_prob`). `loss.off_policy_correction` reads another such pass: each
sampled token's log-prob under the rollout's processed sampling distribution of the current weights, whose ratio to
the behaviour log-prob weights the loss (`off_policy.py`). `probe_fidelity` runs the signal-fidelity probe's tensor part
(`fidelity.py`) on given samples without touching the parameters.

Metrics: micro-batches combine by token share (`metric_sums.py`), mini-batches by their mean; every micro-batch draws
its diagnostics subsample independently, with a seed from (run.seed, optimizer step, micro-batch, rank), so standard
errors add in quadrature.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd_agents.config import Config
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.learner import off_policy, supports
from opd_agents.learner.batching import MicroBatch, collate, episode_mini_batches, micro_batches, padding_ratio
from opd_agents.learner.fidelity import probe_micro_batch
from opd_agents.learner.lora import attach_lora, merged_model, save_merged_and_adapter
from opd_agents.learner.loss_inputs import LossInputs
from opd_agents.learner.masks import entropy_top_ratio_mask, entropy_top_ratio_per_sample
from opd_agents.learner.metric_sums import SE_SUFFIX, accumulate_metrics, finish_metrics
from opd_agents.learner.optim_state import fqn_to_index, fqns, load_dcp_whole
from opd_agents.learner.registry import get_loss
from opd_agents.learner.student import StudentRows, StudentScorer, score_student
from opd_agents.learner.support_logits import diagnostic_rows
from opd_agents.quiet_loading import load_progress
from opd_agents.samples import Sample, TeacherTopK
from opd_agents.sampling import SamplingParams


def compute_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached CPU copy of `tensor`, floating-point ones cast to `dtype` (the master weights' compute-dtype view)."""
    return tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute every decoder layer in backward (non-reentrant: works with frozen inputs, LoRA and FSDP2)."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model: PreTrainedModel) -> bool:
    new = hasattr(type(model), "is_activation_checkpointing")  # the name from transformers 5.2x on
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing"))


def lr_lambda(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step `step`: linear warm-up, then constant / cosine / linear decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1 - min_ratio) * decay


class Learner:
    """Owns the trainable student: float32 master weights and optimizer state, forward and backward in the compute
    dtype (`student.dtype`; auto = bfloat16 on CUDA, float32 on CPU) under autocast, loss math in float32. Pure-bf16
    AdamW would round most updates away at the paper's lr of 1e-6 (verl loads its actor in float32 for this reason).
    With LoRA the frozen base stays in the compute dtype and only the adapters are float32.

    Single process by default; `opd_agents.learner.distributed.DistributedLearner` overrides the hooks marked below
    (which samples this rank trains on, global sums, gradient and metric reduction, full state gathering)."""

    rank: int = 0  # this process's rank among the learner ranks (a distributed learner sets its own)

    def __init__(self, cfg: Config, model_path: str, adapter_path: str | Path | None = None,
                 device: str | None = None, gpu_hold: Any = None) -> None:
        """`adapter_path`: a LoRA adapter to resume (with `learner.lora`); `model_path` is then the base model.
        `device` overrides `run.device` (e.g. `cuda:1`); `gpu_hold` is the Ray reservation of that GPU
        (`gpu_hold.GPUHold`), released by `shutdown`."""
        self.cfg = cfg
        self.device = pick_device(device or cfg.run.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # This thread's current device (`cuda` alone already is): what it allocates by default, and where the
            # nccl weight sync stages (`weight_sync.sending_device`).
            torch.cuda.set_device(self.device)
        self.gpu_hold = gpu_hold
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.student.trust_remote_code)
        self.compute_dtype = resolve_dtype(cfg.student.dtype, self.device.type)
        self.lora = cfg.learner.lora is not None
        # use_safetensors: weights from safetensors only, never the pickled .bin format.
        with load_progress(model_path):
            self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.compute_dtype if self.lora else torch.float32,
                trust_remote_code=cfg.student.trust_remote_code, use_safetensors=True).to(self.device)
        checkpointing = cfg.learner.gradient_checkpointing
        if checkpointing or (checkpointing is None and self.device.type == "cuda"):
            enable_checkpointing(self.model)
        self.loss_spec = get_loss(cfg.loss.name)
        if self.lora:
            self.model = attach_lora(self.model, cfg.learner.lora, adapter_path)
        self.model.train()
        self.scorer = StudentScorer(self.model, cfg.loss.chunk_size)
        self._wrap()
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=opt.lr,
                                           betas=opt.betas,
                                           weight_decay=opt.weight_decay)
        total = cfg.run.steps * self.optimizer_steps_per_update(cfg.rollout.prompts_per_step * cfg.rollout.group_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, opt.warmup_steps, total, opt.lr_schedule, opt.min_lr_ratio))
        self.special_ids = [tuple(self.tokenizer.encode(s, add_special_tokens=False)) for s in cfg.loss.special_tokens]
        self.bad_steps = 0
        self.skipped_steps = 0

    # ---- hooks for data-parallel subclasses ---------------------------------------------------------------------

    def _wrap(self) -> None:
        """Wrap the model for sharded training before the optimizer sees its parameters (no-op here)."""

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        """The context every student forward runs in: autocast to the compute dtype over the float32 master weights
        (none when they are the same). A sharded learner casts through FSDP2's mixed-precision policy instead."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _local_groups(self, idx: list[int], samples: list[Sample]) -> tuple[list[list[int]], int]:
        """This process's micro-batches of a mini-batch, and how many leading ones are real (the rest pad)."""
        groups = micro_batches(idx, samples, self.cfg.optim.micro_batch_tokens)
        return groups, len(groups)

    def _before_backward(self, last: bool) -> None:
        """Called before each micro-batch's backward; `last` on the mini-batch's last one (gradient sync point)."""

    def _global_sum(self, values: list[float]) -> list[float]:
        return values

    def _reduce_grads(self) -> None:
        """Make every process hold the gradient of the whole mini-batch (no-op here)."""

    def _reduce_metrics(self, weighted: dict[str, float]) -> dict[str, float]:
        return weighted

    @property
    def _loss_scale(self) -> float:
        """Factor on each micro-batch loss (a wrapper that averages gradients over ranks needs world size)."""
        return 1.0

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def optimizer_steps_per_update(self, batch: int) -> int:
        """Optimizer steps of an update on `batch` episodes (`episode_mini_batches`)."""
        mini = self.cfg.optim.mini_batch_size or batch
        return max(1, math.ceil(batch / mini))

    # ---- batching -------------------------------------------------------------------------------------------

    def _collate(self, samples: list[Sample], teacher: list[TeacherTopK]) -> MicroBatch:
        lc = self.cfg.loss
        return collate(samples, teacher, pad_id=self.tokenizer.pad_token_id or 0, special_ids=self.special_ids,
                       special_mode=lc.special_token_mode, union_sampled=self.loss_spec.union_sampled(lc),
                       device=self.device)

    @torch.no_grad()
    def student_topk_ids(self, samples: list[Sample], k: int) -> list[torch.Tensor]:
        """The current student's top-k next-token ids (N, k) at every loss position of each sample
        (the student top-K support; the teacher then scores these ids)."""
        head = self.model.get_output_embeddings()
        out: list[torch.Tensor] = []
        for s in samples:  # one sequence per forward: no padding, and memory bounded by the longest sample
            ids = torch.tensor([s.input_ids], device=self.device)
            with self._compute():
                hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
                rows = hidden[torch.tensor(s.loss_positions(), dtype=torch.long, device=self.device) - 1]
                support = supports.student_topk_support(rows, head.weight, k, self.cfg.loss.chunk_size, head.bias)
            out.append(support.cpu())
        return out

    # ---- loss -----------------------------------------------------------------------------------------------

    def diagnostic_seed(self, micro: int) -> int:
        """Seed of micro-batch `micro`'s diagnostics subsample at the current optimizer step: a function of run.seed,
        the step (the scheduler's count, restored on resume), `micro` and the rank, so runs are reproducible."""
        words = [self.cfg.run.seed, self.scheduler.last_epoch, micro, self.rank]
        return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))

    def _student_rows(self, mb: MicroBatch, ids: torch.Tensor, mask: torch.Tensor | None = None,
                      micro: int = 0) -> StudentRows:
        with self._compute():
            return score_student(self.scorer, mb, ids, mask, self.cfg.loss.diagnostic_positions,
                                 self.diagnostic_seed(micro))

    def _loss(self, mb: MicroBatch, mask: torch.Tensor, num_tokens: float, num_seqs: float, micro: int = 0,
              ) -> tuple[torch.Tensor, dict[str, float]]:
        lc = self.cfg.loss
        student = self._student_rows(mb, mb.support_ids, mask if self.loss_spec.uses_support_logits(lc) else None,
                                     micro)
        return self.loss_spec.fn(LossInputs.from_rows(mb, student, mask, num_tokens, num_seqs), lc)

    def _needs_old_policy(self) -> bool:
        lc = self.cfg.loss
        return self.loss_spec.needs_old_logprobs(lc) or (
            lc.entropy_top_ratio is not None and lc.entropy_selection == "per_sample")

    @torch.no_grad()
    def _old_policy(self, minis: list[list[int]], samples: list[Sample], teacher: list[TeacherTopK],
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Sample index -> the student's full-vocabulary log-prob of each loss row's sampled token and its entropy,
        `(N_i,)` each, before this update's first optimizer step (PPO's old policy; verl's `compute_log_prob`).

        One no-grad pass over exactly the micro-batches the update then trains on (same padding, same arithmetic), so
        the first optimizer step's ratio is exactly 1. Every rank runs all its micro-batches, padding ones included
        (sharded forwards are collective); only real ones are kept."""
        old: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for mb, group, is_real in self._update_micro_batches(minis, samples, teacher):
            rows = self._student_rows(mb, mb.support_ids[..., :1])
            if is_real:
                for b, i in enumerate(group):
                    n = samples[i].num_loss_tokens
                    old[i] = (rows.sampled_logprob[b, :n], rows.entropy[b, :n])
        return old

    def _update_micro_batches(self, minis: list[list[int]], samples: list[Sample], teacher: list[TeacherTopK],
                              ) -> Iterator[tuple[MicroBatch, list[int], bool]]:
        """Every micro-batch this rank's update runs, in order: (batch, its sample indices, whether it is real). The
        no-grad passes before an update run them all, padding ones included (sharded forwards are collective), and keep
        only the real ones."""
        for idx in minis:
            groups, real = self._local_groups(idx, samples)
            for j, group in enumerate(groups):
                yield self._collate([samples[i] for i in group], [teacher[i] for i in group]), group, j < real

    def _old_rows(self, mb: MicroBatch, group: list[int], samples: list[Sample],
                  old: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[MicroBatch, torch.Tensor, torch.Tensor]:
        """`mb` with `old_logprobs` (B, L) filled from the old-policy pass; the entropies there (B, L); and the rows
        holding the samples' student tokens (B, L) bool, before any special-token mask. Rows of a sample another rank
        owns (a padding micro-batch's filler) stay 0 / False."""
        logprobs, entropy = torch.zeros_like(mb.behaviour), torch.zeros_like(mb.behaviour)
        tokens = torch.zeros_like(mb.loss_mask)
        for b, i in enumerate(group):
            if i in old:
                n = samples[i].num_loss_tokens
                logprobs[b, :n], entropy[b, :n] = old[i]
                tokens[b, :n] = True
        return replace(mb, old_logprobs=logprobs), entropy, tokens

    @torch.no_grad()
    def _importance(self, minis: list[list[int]], samples: list[Sample], teacher: list[TeacherTopK],
                    ) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
        """Sample index -> the off-policy correction's weight of each student token `(N_i,)` (`off_policy.py`; the
        kind the loss registered for this config, `LossSpec.importance_weight`), and the `offpolicy/*` statistics of
        the update's samples (summed over ranks).

        One no-grad pass before the update's first optimizer step, over the micro-batches the update trains on: each
        sampled token's log-prob under the processed sampling distribution (`rollout.temperature`, `top_k`,
        `top_p`) of the current weights θ, against its behaviour log-prob. A per-turn sample's episode's earlier
        turns decide what it sees (in its prompt, or through the observations they led to): their ratios enter its
        weights (`_episode_offsets`)."""
        lc, r = self.cfg.loss, self.cfg.rollout
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        log_ratio: dict[int, torch.Tensor] = {}
        for mb, group, is_real in self._update_micro_batches(minis, samples, teacher):
            with self._compute():
                current = self.scorer(mb.input_ids, mb.attention_mask, mb.positions, mb.support_ids[..., :1],
                                      mb.sampled_ids, sampling=params)
            if is_real:
                for b, i in enumerate(group):
                    n = samples[i].num_loss_tokens
                    rows = torch.ones(n, dtype=torch.bool)
                    log_ratio[i] = off_policy.log_ratios(current[b, :n].cpu(), mb.behaviour[b, :n].cpu(), rows)
        offsets = self._episode_offsets(samples, log_ratio)
        inclusive = self.loss_spec.importance_weight(lc) == "inclusive"
        weights: dict[int, torch.Tensor] = {}
        sums = [0.0] * off_policy.SUMS
        for i, ratio in log_ratio.items():
            log_w = off_policy.prefix_log_weights(ratio, offsets[i])
            if inclusive:
                log_w = log_w + ratio
            weights[i] = off_policy.correction_weights(log_w, lc.off_policy_correction, lc.importance_cap)
            rows = torch.ones_like(ratio, dtype=torch.bool)
            sums = [a + b for a, b in zip(sums, off_policy.weight_sums(
                log_w, weights[i], ratio, rows, lc.off_policy_correction, lc.importance_cap))]
        return weights, off_policy.weight_metrics(self._global_sum(sums))

    def _episode_offsets(self, samples: list[Sample], log_ratio: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Sample index -> `()` float64 log-likelihood ratio of what precedes it: the sum over its episode's earlier
        turns (per-turn samples: `metadata["turn"]` under one non-empty `episode_id`) of their tokens' log-ratios, 0
        for a whole-conversation sample. The per-sample totals are summed over ranks first, so an episode's turns may
        train on different ranks."""
        totals = [float(log_ratio[i].sum()) if i in log_ratio else 0.0 for i in range(len(samples))]
        if any("turn" in s.metadata for s in samples):
            totals = self._global_sum(totals)
        episodes: dict[str, list[tuple[int, int]]] = {}
        for k, sample in enumerate(samples):
            if sample.episode_id and "turn" in sample.metadata:
                episodes.setdefault(sample.episode_id, []).append((int(sample.metadata["turn"]), k))
        earlier = dict.fromkeys(log_ratio, 0.0)
        for turns in episodes.values():
            running = 0.0
            for _, k in sorted(turns):
                earlier[k] = running
                running += totals[k]
        return {i: torch.tensor(earlier[i], dtype=torch.float64) for i in log_ratio}

    def _weight_rows(self, mb: MicroBatch, group: list[int], samples: list[Sample],
                     weights: dict[int, torch.Tensor]) -> MicroBatch:
        """`mb` with `importance_weights` (B, L) filled from `_importance` (0 at rows of samples another rank owns)."""
        rows = torch.zeros(mb.behaviour.shape, dtype=torch.float32)
        for b, i in enumerate(group):
            if i in weights:
                rows[b, :samples[i].num_loss_tokens] = weights[i]
        return replace(mb, importance_weights=rows.to(self.device))

    @torch.no_grad()
    def _entropy_masks(self, batches: list[MicroBatch]) -> list[torch.Tensor]:
        """`loss.entropy_selection: pooled`: entropy top-ratio selection over the whole mini-batch, a no-grad pre-pass
        on the full path at the mini-batch's start, so the selection uses every position's exact full-vocabulary
        entropy whichever path the loss then takes."""
        ents = [self._student_rows(mb, mb.support_ids[..., :1]).entropy for mb in batches]
        flat_e = torch.cat([e.reshape(-1) for e in ents])
        flat_m = torch.cat([mb.loss_mask.reshape(-1) for mb in batches])
        keep = entropy_top_ratio_mask(flat_e, flat_m, self.cfg.loss.entropy_top_ratio)
        return [k.view_as(e) for k, e in zip(keep.split([e.numel() for e in ents]), ents)]

    # ---- signal-fidelity probe ------------------------------------------------------------------------------

    def probe_fidelity(self, samples: list[Sample], teacher: list[TeacherTopK], teacher_full: list[TeacherTopK],
                       seed: int) -> dict[str, float]:
        """`fidelity.probe_micro_batch` at up to `fidelity.positions` loss positions of `samples`, drawn uniformly
        with `seed`. teacher: the configured loss's teacher answers; teacher_full: the same teacher's full
        distribution (K = the vocabulary) for the reference. An empty probe gives {}."""
        mb = self._collate(samples, teacher)
        B, L = mb.loss_mask.shape
        scored = torch.zeros(B, L, dtype=torch.bool)
        for b, out in enumerate(teacher_full):
            scored[b, :out.topk_ids.shape[0]] = True if out.scored is None else out.scored
        rows = diagnostic_rows(mb.loss_mask & scored.to(self.device), self.cfg.fidelity.positions, seed)
        if not rows.numel():
            return {}
        with self._compute():
            return probe_micro_batch(self.model, self.loss_spec, self.cfg.loss, mb, rows, teacher_full)

    # ---- update ---------------------------------------------------------------------------------------------

    def update(self, samples: list[Sample], teacher: list[TeacherTopK], lr_scale: float = 1.0) -> dict[str, float]:
        """One or more optimizer steps on a rollout batch, at ``lr_scale`` times the scheduled learning rate (the
        task's ``lr_scale``); returns averaged metrics (loss, grad_norm, lr, ...)."""
        if len(samples) != len(teacher):
            raise ValueError(f"{len(samples)} samples but {len(teacher)} teacher outputs")
        minis = episode_mini_batches(samples, self.cfg.optim.mini_batch_size)
        old = self._old_policy(minis, samples, teacher) if self._needs_old_policy() else None
        weights, offpolicy = None, {}
        if self.cfg.loss.off_policy_correction != "none":
            weights, offpolicy = self._importance(minis, samples, teacher)
        history = [self._optimizer_step(idx, samples, teacher, lr_scale, old, weights) for idx in minis]
        out: dict[str, float] = {}
        for k in {k for h in history for k in h}:
            seen = [h[k] for h in history if k in h]
            # The mean of independent estimates: standard errors add in quadrature.
            total = math.sqrt(sum(v * v for v in seen)) if k.endswith(SE_SUFFIX) else sum(seen)
            out[k] = total / len(seen)
        out |= offpolicy
        out["optimizer_steps"] = float(len(history))
        out["skipped_steps_total"] = float(self.skipped_steps)
        return out

    def _optimizer_step(self, idx: list[int], samples: list[Sample], teacher: list[TeacherTopK],
                        lr_scale: float = 1.0, old: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                        weights: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        lc = self.cfg.loss
        groups, real = self._local_groups(idx, samples)
        batches = [self._collate([samples[i] for i in g], [teacher[i] for i in g]) for g in groups]
        # Padding micro-batches (ranks with less data must still join every collective) train on nothing.
        masks = [mb.loss_mask if j < real else torch.zeros_like(mb.loss_mask) for j, mb in enumerate(batches)]
        if old is not None:
            filled = [self._old_rows(mb, g, samples, old) for mb, g in zip(batches, groups)]
            batches = [mb for mb, _, _ in filled]
            if lc.entropy_top_ratio is not None and lc.entropy_selection == "per_sample":
                # As the paper's code: among each sample's student tokens, before its special-token mask.
                masks = [m & entropy_top_ratio_per_sample(entropy, tokens, lc.entropy_top_ratio)
                         for m, (_, entropy, tokens) in zip(masks, filled)]
        if weights is not None:
            batches = [self._weight_rows(mb, g, samples, weights) for mb, g in zip(batches, groups)]
        if lc.entropy_top_ratio is not None and lc.entropy_selection == "pooled":
            masks = [m & e.bool() for m, e in zip(masks, self._entropy_masks(batches))]
        local = [float(sum(int(m.sum()) for m in masks)), float(sum(int(m.any(-1).sum()) for m in masks))]
        num_tokens, num_seqs = (max(1.0, x) for x in self._global_sum(local))
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        weighted: dict[str, float] = {}
        for micro, (mb, mask) in enumerate(zip(batches, masks)):
            loss, metrics = self._loss(mb, mask, num_tokens, num_seqs, micro)
            self._before_backward(micro == len(batches) - 1)
            (loss * self._loss_scale).backward()
            total_loss += float(loss.detach())
            accumulate_metrics(weighted, metrics, float(mask.sum()) / num_tokens)
        self._reduce_grads()
        (total_loss,) = self._global_sum([total_loss])
        weighted = finish_metrics(self._reduce_metrics(weighted))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        # A sharded model's norm is a DTensor: the global norm is its full value.
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.bad_steps >= self.cfg.optim.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} consecutive optimizer steps had a non-finite loss or gradient "
                    f"(loss={total_loss}, grad_norm={grad_norm}); stopping (optim.max_bad_steps="
                    f"{self.cfg.optim.max_bad_steps}). Lower optim.lr or set loss.log_ratio_clip.")
            return {"loss": total_loss, "grad_norm": grad_norm, "skipped": 1.0}
        self.bad_steps = 0
        lr = self.scheduler.get_last_lr()[0] * lr_scale
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = base * lr_scale
        self.optimizer.step()
        for group, base in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = base  # the scheduler owns the unscaled rate
        self.scheduler.step()
        return {"loss": total_loss, "grad_norm": grad_norm, "lr": lr, "tokens": num_tokens, "skipped": 0.0,
                "padding_ratio": padding_ratio(groups[:real], samples), **weighted}

    # ---- state ----------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """The student as a plain `from_pretrained` folder (LoRA: merged weights, plus the adapter to resume)."""
        if self.lora:
            save_merged_and_adapter(self.model, path)
        else:
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copy of the student's parameters in the compute dtype (LoRA: merged), what rollout workers and exports
        receive."""
        model = merged_model(self.model) if self.lora else self.model
        return {k: compute_copy(v, self.compute_dtype) for k, v in model.state_dict().items()}

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps}

    def shutdown(self) -> None:
        """Release what the learner holds beyond this process's memory: the Ray GPU reservation, if any
        (`gpu_hold.GPUHold`; multi-rank learners: see LearnerGroup)."""
        hold, self.gpu_hold = self.gpu_hold, None
        if hold is not None:
            hold.release()

    def load_state(self, state: dict[str, Any], folder: str | Path | None = None) -> None:
        """Resume optimizer and counters; `folder` is the checkpoint (needed when N ranks wrote sharded state)."""
        opt = state["optimizer"]
        if "dcp" in opt:
            if folder is None:
                raise ValueError("this checkpoint's optimizer state is sharded: pass its checkpoint folder")
            opt = fqn_to_index(load_dcp_whole(Path(folder) / opt["dcp"]), fqns(self.scorer))
        self.optimizer.load_state_dict(opt)
        self._load_counters(state)

    def _load_counters(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.bad_steps = state["bad_steps"]
        self.skipped_steps = state["skipped_steps"]
