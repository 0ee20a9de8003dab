"""The student's side of one micro-batch's OPD loss: its forward at the loss rows.

Owns the student's forward for the loss as one module (`StudentScorer`, so a sharding wrapper sees every parameter
use), its output (`StudentRows`) and the choice of logits path (`score_student`). The micro-batches come from
`batching.py`, the loss that consumes these rows from `registry.py`; the learner accumulates gradients and steps.

The student's logits for the loss take one of two paths (`loss.student_logits`): the support path (default wherever it
is exact: topk_reverse_kl renormalised inside the support) evaluates the LM head only at the K support ids of each
loss row, and computes the full-vocabulary diagnostics (entropy, sampled-token gap, support mass) without gradient
on a seeded uniformly random subsample of rows (`loss.diagnostic_positions`: unbiased estimates, with standard
errors); the full path computes all V logits per row in checkpointed chunks, with every diagnostic exact.

Shapes inside a micro-batch: B samples, T = longest sequence, L = most loss positions of a sample, K = support
size, H = hidden size. Row (b, l) of a `(B, L, …)` tensor is the l-th loss position of sample b; its next-token
distribution comes from the hidden state one position earlier.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from opd_agents.learner import supports
from opd_agents.learner.batching import MicroBatch
from opd_agents.learner.support_logits import diagnostic_rows, support_logits
from opd_agents.sampling import SamplingParams

# The support path's no-grad diagnostics hold two (rows, V) fp32 buffers at a time (log-probs and probabilities),
# the off-policy correction's pass a few (the sampler's weights, scores and processed log-probs); they take at most
# this many elements per chunk (32 MiB: 55 rows at V = 152k) whatever `loss.chunk_size` is, so neither adds much to
# the learner's peak. Rows are independent: the chunk changes no value.
DIAGNOSTIC_CHUNK_ELEMENTS = 1 << 23


class StudentRows(NamedTuple):
    """The student's side of the loss at a micro-batch's (B, L) loss rows."""

    support: torch.Tensor  # (B, L, K) full path: full-vocabulary log-probs at the ids; support path: raw logits
    is_logits: bool  # True on the support path
    vocab_logprobs: torch.Tensor | None  # (B, L, K) full-vocabulary log-probs at the ids, valid where vocab_mask
    entropy: torch.Tensor | None  # (B, L) full-vocabulary entropy, valid where vocab_mask
    sampled_logprob: torch.Tensor | None  # (B, L) full-vocabulary log-prob of the sampled token, where vocab_mask
    vocab_mask: torch.Tensor | None  # (B, L) bool: rows whose full-vocabulary values exist; None = every row


class StudentScorer(torch.nn.Module):
    """The student's forward for the loss, as one module: decoder → hidden rows of the loss positions → lm_head at
    the support ids. One module call (not decoder + head separately) so a sharding wrapper (FSDP2) sees every
    parameter use inside its forward/backward hooks."""

    def __init__(self, model: PreTrainedModel, chunk: int) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                ids: torch.Tensor, sampled_ids: torch.Tensor, vocab_rows: torch.Tensor | None = None,
                sampling: SamplingParams | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
        """input_ids, attention_mask (B, T); positions, sampled_ids (B, L); ids (B, L, K) -> support (B, L, K),
        vocab log-probs at ids (B, L, K), entropy (B, L), sampled-token log-prob (B, L).

        vocab_rows None, the full path: all V logits per row in checkpointed chunks; support and vocab log-probs are
        the same full-vocabulary log-probs, all differentiable. vocab_rows (N,) flat indices into the B·L rows, the
        support path: support = raw logits at ids (only K lm_head rows per row, differentiable); the full-vocabulary
        values are computed without gradient at those N rows only and are 0 elsewhere. sampling given (no grad; the
        off-policy correction's pass): only the sampled tokens' log-probs under that processed sampling distribution
        (B, L) (`supports.processed_sampled_logprob`), -inf outside its kept set."""
        # use_cache=False: a training forward keeps no KV cache (and none is allowed with checkpointed layers).
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        B, L, K = ids.shape
        rows = hidden.gather(1, (positions - 1).unsqueeze(-1).expand(B, L, hidden.shape[-1])).reshape(B * L, -1)
        head = self.model.get_output_embeddings()
        flat_ids, flat_sampled = ids.reshape(B * L, K), sampled_ids.reshape(-1)
        if sampling is not None:  # several (rows, V) fp32 buffers per chunk (the sampler's): the diagnostics' bound
            chunk = max(1, min(self.chunk, DIAGNOSTIC_CHUNK_ELEMENTS // head.weight.shape[0]))
            return supports.processed_sampled_logprob(rows, head.weight, flat_sampled, sampling, bias=head.bias,
                                                      chunk=chunk).view(B, L)
        if vocab_rows is None:
            out = supports.gather_student_logprobs(rows, head.weight, flat_ids, bias=head.bias,
                                                   sampled_ids=flat_sampled,
                                                 chunk=self.chunk)
            logprobs = out.logprobs.view(B, L, K)
            return logprobs, logprobs, out.entropy.view(B, L), out.sampled_logprob.view(B, L)
        logits = support_logits(rows, head.weight, flat_ids, bias=head.bias, chunk=self.chunk)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        vocab, entropy, sampled = (rows.new_zeros(shape, dtype=dtype) for shape in ((B * L, K), (B * L,), (B * L,)))
        if vocab_rows.numel():
            chunk = max(1, min(self.chunk, DIAGNOSTIC_CHUNK_ELEMENTS // head.weight.shape[0]))
            with torch.no_grad():
                out = supports.gather_student_logprobs(rows[vocab_rows], head.weight, flat_ids[vocab_rows],
                                                     bias=head.bias, sampled_ids=flat_sampled[vocab_rows],
                                                     chunk=chunk)
            vocab[vocab_rows], entropy[vocab_rows], sampled[vocab_rows] = out.logprobs, out.entropy, out.sampled_logprob
        return logits.view(B, L, K), vocab.view(B, L, K), entropy.view(B, L), sampled.view(B, L)


def score_student(scorer: StudentScorer, mb: MicroBatch, ids: torch.Tensor, mask: torch.Tensor | None,
                  diagnostic_positions: int | None, seed: int = 0) -> StudentRows:
    """The student at `ids` (B, L, K) for every loss row. mask None: the full path (all V logits, exact
    full-vocabulary values at every row). mask (B, L): the support path, with the full-vocabulary values on the
    `diagnostic_positions` random subsample of mask drawn with `seed` (`support_logits.diagnostic_rows`; none when it
    is 0)."""
    if mask is None:
        logprobs, vocab, entropy, sampled = scorer(mb.input_ids, mb.attention_mask, mb.positions, ids, mb.sampled_ids)
        return StudentRows(logprobs, False, vocab, entropy, sampled, None)
    rows = diagnostic_rows(mask, diagnostic_positions, seed)
    support, vocab, entropy, sampled = scorer(mb.input_ids, mb.attention_mask, mb.positions, ids, mb.sampled_ids,
                                              rows)
    if diagnostic_positions == 0:
        return StudentRows(support, True, None, None, None, None)
    vocab_mask = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    vocab_mask[rows] = True
    return StudentRows(support, True, vocab, entropy, sampled, vocab_mask.view_as(mask))
