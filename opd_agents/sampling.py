"""Sampling parameters and the logits → (token, behaviour log-prob) step shared by the in-process policies.

A ground-floor module (pure torch): the rollout samples with it and the learner's off-policy correction recomputes
the same processed distribution with it (`learner/off_policy.py`), so both read one definition.

Shapes: logits are (B, V) for one decoding step of B sequences; ids and log-probs are (B,).

Behaviour log-probs are taken under the distribution the token was *actually* drawn from: logits divided
by the temperature, cut to the top-k and then to the top-p nucleus, and renormalised inside what is left.
This is what PPO-style ratio clipping (sampled-token OPD) needs as the old-policy probability, and it is
what vLLM reports with `logprobs_mode="processed_logprobs"`. A token outside the nucleus is never sampled,
and the one token of a nucleus of size one has log-prob exactly 0.0. Greedy decoding is a point mass, so
its behaviour log-prob is 0.0 too (greedy is for evaluation, never trained on).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the student samples one response.

    top_p = 1.0 and top_k = 0 switch the cuts off. `seed` makes one `generate` call reproducible (each
    backend derives per-sequence randomness from it); None draws from the policy's own running generator.
    """

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"SamplingParams.temperature must be > 0 (got {self.temperature}); "
                             "use greedy=True for argmax decoding.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (got {self.top_p}); "
                             "1.0 disables nucleus sampling.")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (got {self.top_k}); 0 disables the top-k cut.")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1 (got {self.max_new_tokens}).")

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)


NUCLEUS_PROBES = (1024, 16384)  # partial sorts tried, smallest first, before the nucleus is looked for in whole rows
DRAW_BLOCK = 1024  # tokens per block of the two-level inverse CDF that draws from a whole row


class StepSampler:
    """Draws one token per row from a decoding step's (B, V) logits under `params`; one per `generate` call.

    The step's unnormalised probabilities w = exp(s − max s), s = logits / temperature, go into one (B, V) float32
    buffer that the sampler keeps across the steps of a batch. Why: a fresh (B, V) buffer per step costs a page fault
    per 4 KiB page once large buffers come from mmap (`ray.malloc_mmap_threshold_kib`, opd_agents/malloc.py), which at
    V = 152k was most of a step's sampling time (`benchmarks/sampler.py`).

    The candidates: with top-k, the k most likely tokens (`topk`); with top-p alone, the nucleus looked for among each
    row's 1,024 most likely tokens, then its 16,384 (NUCLEUS_PROBES), and in whole sorted rows only when some row's
    probe still holds less than top-p. Why: on CPU a full sort of an [8, 152k] batch costs ~40 ms, a `topk` of 1,024
    ~2 ms and of 16,384 ~8 ms, and a trained model's nucleus is usually tens of tokens (a random model's most of V). The
    nucleus is the smallest prefix, most likely first, whose mass reaches top-p of the candidates' mass. The draw is
    an inverse CDF: one uniform per row located in the kept candidates' cumulative mass (float64); without a cut, in
    two levels over the whole row — which block of DRAW_BLOCK tokens, then where in it — so no (B, V) float64 sum is
    built. Token i is drawn with probability p_i up to float32 rounding of the block masses (relative ~1e-7); a token
    of zero mass is never drawn. Why not `torch.multinomial`: on CPU it costs several times this at V = 152k.
    """

    def __init__(self, params: SamplingParams, generator: torch.Generator | None) -> None:
        self.params = params
        self.generator = generator
        self._buffer: torch.Tensor | None = None  # (B, V rounded up to DRAW_BLOCK) float32; 0 past V

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) logits → ((B,) token ids, (B,) float32 behaviour log-probs)."""
        if self.params.greedy:
            ids = torch.argmax(logits, dim=-1)
            return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        weights, top = self._weights(logits)
        support = self._support(weights)
        if support is None:
            ids, mass = self._draw_whole_rows(weights)
        else:
            _, cand_ids, kept_cdf = support
            mass = kept_cdf[:, -1:]
            ids = cand_ids.gather(-1, torch.searchsorted(kept_cdf, self._uniform(mass), right=True))
        return ids.squeeze(-1), log_prob(self._scores(logits.gather(-1, ids)), top, mass).squeeze(-1)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits → float32 scores s = logits / temperature, the same arithmetic for a whole row or a gathered token."""
        scores = logits.float()
        return scores if self.params.temperature == 1.0 else scores / self.params.temperature

    def _weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) logits → (w (B, V), a view of the kept buffer; max s (B, 1))."""
        rows, vocab = logits.shape
        width = -(-vocab // DRAW_BLOCK) * DRAW_BLOCK if vocab > DRAW_BLOCK else vocab
        buf = self._buffer
        if buf is None or buf.shape != (rows, width) or buf.device != logits.device:
            buf = self._buffer = torch.zeros(rows, width, dtype=torch.float32, device=logits.device)
        if width > vocab:
            buf[:, vocab:].zero_()  # the padding past V (a call with another V may have left weights there)
        weights = buf[:, :vocab]
        weights.copy_(logits)
        if self.params.temperature != 1.0:
            weights.div_(self.params.temperature)
        top = weights.amax(dim=-1, keepdim=True)
        weights.sub_(top).exp_()
        return weights, top

    def _row_cdf(self, weights: torch.Tensor) -> torch.Tensor:
        """Float64 cumulative masses whose last column is each row's mass: over the V tokens when V ≤ DRAW_BLOCK
        (B, V), else over the buffer's blocks of DRAW_BLOCK tokens (B, blocks)."""
        if weights.shape[-1] <= DRAW_BLOCK:
            return weights.double().cumsum(-1)
        assert self._buffer is not None
        rows, width = self._buffer.shape
        return self._buffer.view(rows, width // DRAW_BLOCK, DRAW_BLOCK).sum(-1).double().cumsum(-1)

    def _support(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The candidates most likely first: (B, n) float64 weights (0 past the nucleus) and token ids, and the kept
        ones' cumulative mass (B, n) float64 (flat past the nucleus); None when neither top-k nor top-p cuts the row."""
        params, vocab = self.params, weights.shape[-1]
        cut_k = 0 < params.top_k < vocab
        if not cut_k and params.top_p >= 1.0:
            return None
        if cut_k:
            vals, ids = torch.topk(weights, params.top_k, dim=-1)
            vals = vals.double()
            cdf = vals.cumsum(-1)
            total = cdf[:, -1:]
        else:
            total = self._row_cdf(weights)[:, -1:]
            sizes = [*(n for n in NUCLEUS_PROBES if n < vocab), vocab]  # partial sorts, then whole rows
            held = 0
            for size in sizes:
                # Skip a probe that cannot hold every row's nucleus: past the held tokens each further one weighs at
                # most the last held one (rows are sorted), so mass(size) <= held mass + (size - held) * its weight.
                # (Skipping never changes the nucleus, only which partial sort finds it.)
                if held and size < vocab and not bool(
                        (cdf[:, -1:] + (size - held) * vals[:, -1:] >= params.top_p * total).all()):
                    continue
                vals, ids = torch.topk(weights, size, dim=-1) if size < vocab else \
                    torch.sort(weights, dim=-1, descending=True)
                vals = vals.double()
                cdf = vals.cumsum(-1)
                held = size
                if size == vocab or bool((cdf[:, -1:] >= params.top_p * total).all()):
                    break
        if params.top_p < 1.0:
            # Keep a token while the mass strictly before it is < top_p of the candidates' mass.
            vals = vals.masked_fill((cdf - vals) >= params.top_p * total, 0.0)
            cdf = vals.cumsum(-1)
        return vals, ids, cdf

    def _uniform(self, total: torch.Tensor) -> torch.Tensor:
        """(B, 1) float64 masses → one uniform in [0, total) per row.

        u < total exactly (rand < 1, and a product with a factor below 1 never rounds up to the other factor), so the
        first cumulative mass above u belongs to a token of positive mass."""
        return torch.rand(total.shape, generator=self.generator, dtype=torch.float64, device=total.device) * total

    def _draw_whole_rows(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw from whole rows → ((B, 1) ids, (B, 1) row masses): in one level when V ≤ DRAW_BLOCK, else the block by
        its cumulative mass, then the token inside it."""
        cdf = self._row_cdf(weights)
        mass = cdf[:, -1:]
        u = self._uniform(mass)
        j = torch.searchsorted(cdf, u, right=True)  # (B, 1): a token, or a block, of positive mass
        if weights.shape[-1] <= DRAW_BLOCK:
            return j, mass
        assert self._buffer is not None
        rows, blocks = cdf.shape
        before = torch.where(j > 0, cdf.gather(-1, (j - 1).clamp(min=0)), 0.0)
        inside = self._buffer.view(rows, blocks, DRAW_BLOCK).gather(1, j[:, :, None].expand(rows, 1, DRAW_BLOCK))[:, 0]
        inner_cdf = inside.double().cumsum(-1)  # (B, DRAW_BLOCK)
        # The block's float32 sum and its float64 cumsum round differently: place u in the cumsum's own scale, and
        # never past the block's last token of positive mass.
        r = (u - before) * inner_cdf[:, -1:] / (cdf.gather(-1, j) - before)
        k = torch.searchsorted(inner_cdf, r, right=True)
        last = torch.where(inside > 0, torch.arange(DRAW_BLOCK, device=inside.device), 0).amax(-1, keepdim=True)
        return j * DRAW_BLOCK + torch.minimum(k, last), mass


def log_prob(scores: torch.Tensor, top: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """log p = (s − max s) − log(kept mass): the difference in float32, the log of the float64 mass and the
    subtraction in float64, returned as float32 — one formula for sampled and reference log-probs."""
    return ((scores - top) - mass.log()).float()


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) log-probs of the sampling distribution: temperature, top-k, top-p, renormalised; -inf outside.

    The reference for `StepSampler`: on the same (B, V) logits the same candidates and the same arithmetic, so a
    sampled token's behaviour log-prob equals this at its id bit for bit. On other logits holding the same row (e.g.
    one sequence recomputed alone) the values agree to float rounding, and the kept set too except where tokens of
    equal weight straddle the nucleus' boundary: which probe (or the full sort) runs depends on every row of the
    batch, and the two order ties differently. Without a cut, a token whose float32 weight underflows to 0 keeps its
    finite log-prob here although the sampler never draws it; with a cut it is -inf."""
    sampler = StepSampler(params, None)
    weights, top = sampler._weights(logits)
    scores = sampler._scores(logits)
    support = sampler._support(weights)
    if support is None:
        return log_prob(scores, top, sampler._row_cdf(weights)[:, -1:])
    vals, ids, kept_cdf = support
    kept = log_prob(scores.gather(-1, ids), top, kept_cdf[:, -1:]).masked_fill(vals == 0, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, ids, kept)


def sample_step(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: (B, V) logits → ((B,) token ids, (B,) behaviour log-probs). A decoding loop keeps one
    `StepSampler` instead, which reuses its buffer across steps."""
    return StepSampler(params, generator)(logits)
