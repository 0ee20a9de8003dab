"""Sampling parameters and the logits → (token, behaviour log-prob) step shared by the in-process policies.

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


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from several integers (request seed, chunk, turn, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) log-probs of the sampling distribution: temperature, top-k, top-p, renormalised; -inf outside."""
    scores = logits.float() if params.temperature == 1.0 else logits.float() / params.temperature  # (B, V)
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = scores.masked_fill(nucleus_drop(scores, params.top_p), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


NUCLEUS_PROBE = 1024  # tokens a partial sort tries before `nucleus_drop` sorts whole rows


def nucleus_drop(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) scores → (B, V) bool, True outside the top-p nucleus: the smallest prefix of the row sorted by
    probability whose mass reaches `top_p` is kept.

    The nucleus is looked for among each row's NUCLEUS_PROBE most likely tokens first (a partial sort); only when some
    row's probe holds less than `top_p` of its mass are the whole rows sorted. Why: a full sort of an [8, 152k] row
    batch costs ~100 ms on CPU, several times the rest of a decode step (`benchmarks/sampler.py`), while a trained
    model's nucleus is usually tens of tokens. Both ways keep the same tokens (up to which of equal-probability
    tokens at the boundary is kept).
    """
    row_probs = torch.softmax(scores, dim=-1)  # one set of probabilities for both ways, so they decide alike
    probs, order = torch.topk(row_probs, min(NUCLEUS_PROBE, scores.shape[-1]), dim=-1)  # (B, k), descending
    mass = torch.cumsum(probs, dim=-1)
    if not bool((mass[:, -1] >= top_p).all()):  # a nucleus wider than the probe: sort the whole rows
        probs, order = torch.sort(row_probs, dim=-1, descending=True)
        mass = torch.cumsum(probs, dim=-1)
    # Keep a token while the mass strictly before it is < top_p; tokens outside the probe stay dropped.
    drop_sorted = (mass - probs) >= top_p
    return torch.ones_like(scores, dtype=torch.bool).scatter(-1, order, drop_sorted)


def sample_step(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: (B, V) logits → ((B,) token ids, (B,) behaviour log-probs)."""
    if params.greedy:
        ids = torch.argmax(logits, dim=-1)
        return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    logp = processed_logprobs(logits, params)
    ids = draw(logp, generator)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def draw(logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) log-probs → (B,) token ids, one draw per row by the inverse CDF: one uniform per row, located in the
    row's cumulative mass (summed in float64, so no boundary moves by more than ~V·1e-16).

    Token i is drawn with probability exactly p_i; a -inf token (p = 0) adds no width to the CDF and is never drawn.
    Why not `torch.multinomial`: on CPU it costs about eight times this at V = 152k, the largest part of a small
    model's decoding step there (`benchmarks/sampler.py`).
    """
    cdf = torch.cumsum(logp.exp(), dim=-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]
    # u < total exactly (rand < 1, and a product with a factor below 1 never rounds up to the other factor), so the
    # first cdf entry above u is a token of positive mass, never index V or a trailing zero-mass token.
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=logp.device) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)
