"""The signal-fidelity probe's tensor part: does the configured loss push the student's logits where the exact
objective does?

Owns `signal_fidelity` (pure tensor code): at N probe positions, the gradient of the exact full-vocabulary reverse-KL
Σ_v p_S (log p_S − log p_T) with respect to the student's logits, against the configured loss's gradient with respect
to the same logits (autograd on a detached leaf: nothing reaches the model). A loss whose gradient is orthogonal or
opposed to the reference's (cosine ≤ 0: e.g. a top-K KL used as a detached advantage, whose expected gradient is 0)
trains nothing useful, however its value moves. `probe_micro_batch` runs it on given rows of a micro-batch: the
student's logits there (one no-grad forward), the teacher's full rows, and the loss presented those rows as the
learner would (`probe_rows`, `student_rows_from_logits`). Which samples are probed, when, and the stop rule are the
run's (`opd_agents/run/fidelity.py`).

Shapes: N probe positions, V the vocabulary; a micro-batch is (B, L) loss rows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from opd_agents.config import LossConfig
from opd_agents.learner.batching import MicroBatch
from opd_agents.learner.loss_inputs import LossInputs
from opd_agents.learner.losses import LOGPROB_FLOOR, full_reverse_kl
from opd_agents.learner.registry import LossSpec
from opd_agents.learner.student import StudentRows
from opd_agents.samples import TeacherTopK

LossOfLogits = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
CLIP_KEYS: tuple[str, ...] = ("clip_fraction", "log_ratio_clip_fraction")


def _logits_grad(loss_of_logits: LossOfLogits, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """∂loss/∂logits `(N, V)` on a fresh leaf (zeros when the loss does not depend on the logits), and its metrics."""
    leaf = logits.detach().clone().requires_grad_(True)
    loss, metrics = loss_of_logits(leaf)
    if not loss.requires_grad:
        return torch.zeros_like(leaf), metrics
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return (torch.zeros_like(leaf) if grad is None else grad), metrics


def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Cosine of `a` and `b` (flattened, or along `dim`); 0 where either is the zero vector."""
    dot = (a * b).sum() if dim is None else (a * b).sum(dim)
    norms = (a.norm() * b.norm()) if dim is None else a.norm(dim=dim) * b.norm(dim=dim)
    return torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(norms.dtype).tiny), torch.zeros_like(dot))


def signal_fidelity(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, loss_of_logits: LossOfLogits,
) -> dict[str, float]:
    """Compare the configured loss's gradient with the exact reverse-KL's at N positions.

    student_logits `(N, V)`: the student's raw logits (detached here; float32 at least). teacher_logprobs `(N, V)`:
    the teacher's full-vocabulary log-probs (renormalised over V, so ids the teacher could not score may be floored).
    loss_of_logits: maps a logits leaf `(N, V)` to the configured loss `(loss, metrics)`, token-mean over the N
    positions (the reference is a token mean too, so `rel_norm` compares like with like).
    Metrics: cosine (of the flattened `(N·V)` gradients), position_cosine (mean over positions of the per-position
    cosine, 0 where either gradient is zero), rel_norm (‖∇ loss‖ / ‖∇ reference‖), zero_grad_frac (positions where the
    loss's gradient is exactly zero: clipped, masked out, or K = 1 renormalised), clip_fraction (the loss's own
    active-clip fraction, where it reports one), num_positions.
    """
    logits = student_logits.detach()
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    teacher = teacher_logprobs.detach().to(logits.dtype)
    everywhere = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    ref, _ = _logits_grad(lambda z: full_reverse_kl(z, teacher, everywhere), logits)
    grad, loss_metrics = _logits_grad(loss_of_logits, logits)
    ref_norm = ref.norm()
    metrics = {
        "cosine": _cosine(grad, ref),
        "position_cosine": _cosine(grad, ref, dim=-1).mean(),
        "rel_norm": grad.norm() / ref_norm.clamp(min=torch.finfo(ref_norm.dtype).tiny),
        "zero_grad_frac": (grad == 0).all(-1).to(logits.dtype).mean(),
        "num_positions": torch.tensor(float(logits.shape[0])),
    }
    out = {k: float(v) for k, v in metrics.items()}
    clip = next((loss_metrics[k] for k in CLIP_KEYS if k in loss_metrics), None)
    return out if clip is None else out | {"clip_fraction": float(clip)}


def probe_rows(mb: MicroBatch, rows: torch.Tensor) -> MicroBatch:
    """The micro-batch's loss rows `rows` (flat indices into its B·L rows) as one `(1, N, …)` row of a MicroBatch;
    input_ids / attention_mask stay the whole micro-batch's (a loss reads only the row tensors)."""

    def take(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(-1, *x.shape[2:])[rows].unsqueeze(0)

    return MicroBatch(mb.input_ids, mb.attention_mask, take(mb.positions), torch.ones_like(take(mb.loss_mask)),
                      take(mb.support_ids), take(mb.teacher_logprobs), take(mb.support_mask), take(mb.sampled_ids),
                      take(mb.behaviour), take(mb.teacher_sampled), take(mb.turns))


def student_rows_from_logits(logits: torch.Tensor, probe: MicroBatch, on_logits: bool) -> StudentRows:
    """`StudentRows` `(1, N, …)` computed from full student logits `(N, V)` (differentiable), as the learner's path
    for the loss would give them: raw logits at the support ids (support path) or full-vocabulary log-probs."""
    logp = torch.log_softmax(logits, dim=-1)
    ids, sampled = probe.support_ids[0], probe.sampled_ids[0]
    vocab = logp.gather(-1, ids)
    support = logits.gather(-1, ids) if on_logits else vocab
    entropy = -(logp.exp() * logp).sum(-1).detach()
    sampled_lp = logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    return StudentRows(support.unsqueeze(0), on_logits, vocab.unsqueeze(0), entropy.unsqueeze(0),
                       sampled_lp.unsqueeze(0), None)


def probe_micro_batch(model: PreTrainedModel, spec: LossSpec, lc: LossConfig, mb: MicroBatch, rows: torch.Tensor,
                      teacher_full: list[TeacherTopK]) -> dict[str, float]:
    """`signal_fidelity` at the flat loss rows `rows` `(N,)` of `mb` (B samples × L loss rows).

    teacher_full: each sample's teacher answer with K = the vocabulary (ids -1 have no student counterpart and get no
    mass). The configured loss runs on those rows as one token-mean (aggregation weights are not the signal) and
    without entropy_top_ratio's mini-batch selection; nothing reaches the model's parameters.
    """
    B, L = mb.loss_mask.shape
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                     use_cache=False).last_hidden_state
        index = (mb.positions - 1).unsqueeze(-1).expand(B, L, hidden.shape[-1])
        head = model.get_output_embeddings()
        logits = F.linear(hidden.gather(1, index).reshape(B * L, -1)[rows], head.weight, head.bias)
    with torch.autocast(logits.device.type, enabled=False):  # the forward may autocast; the comparison is float32
        return _probe_at(spec, lc, mb, rows, teacher_full, logits.to(torch.promote_types(logits.dtype, torch.float32)))


def _probe_at(spec: LossSpec, lc: LossConfig, mb: MicroBatch, rows: torch.Tensor, teacher_full: list[TeacherTopK],
              logits: torch.Tensor) -> dict[str, float]:
    """`signal_fidelity` given the student's float32 logits `(N, V)` at the probe rows."""
    L = mb.loss_mask.shape[1]
    # The teacher's full rows at the probe positions only (never a (B, L, V) batch).
    at = [divmod(int(r), L) for r in rows.cpu()]
    ids = torch.stack([teacher_full[b].topk_ids[i] for b, i in at]).to(logits.device)
    lp = torch.stack([teacher_full[b].topk_logprobs[i] for b, i in at]).to(logits.device, logits.dtype)
    lp = lp.masked_fill(ids < 0, LOGPROB_FLOOR)
    vocab = torch.full_like(logits, LOGPROB_FLOOR).scatter_reduce(-1, ids.clamp(min=0), lp, "amax")
    probe = probe_rows(mb, rows)
    # The probe runs before the update: its old policy is the student as it is (PPO's first-step ratio of 1).
    sampled = probe.sampled_ids[0].unsqueeze(-1)
    probe = replace(probe, old_logprobs=torch.log_softmax(logits, dim=-1).gather(-1, sampled).squeeze(-1).unsqueeze(0))
    n = float(rows.numel())
    token_mean = lc.model_copy(update={"aggregation": "token_mean"})
    on_logits = spec.uses_support_logits(lc)

    def loss_of_logits(z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = LossInputs.from_rows(probe, student_rows_from_logits(z, probe, on_logits), probe.loss_mask, n,
                                      1.0)
        return spec.fn(inputs, token_mean)

    return signal_fidelity(logits, vocab, loss_of_logits)
