"""One decoding step's sampling on CPU, before and after: nucleus by full sort vs by partial-sort probe, and the draw
by `torch.multinomial` vs by the inverse CDF (`opd_agents.rollout.sampling`), side by side.

    python benchmarks/sampler.py [--quick] [--threads N]
B = 8 rows of random logits, normal with std 3 ("wide": at V = 152,064 a top-p 0.9 nucleus of ~6k tokens, more than
the probe's NUCLEUS_PROBE = 1,024, so the full sort runs) or std 6 ("peaked": 7–83 tokens, like a trained model's);
V = 506 (the env-text tokenizer) and V = 152,064 (Qwen2.5's vocabulary); top-p 1.0 (the TRL step benchmark's
setting) and 0.9 (the default config's). Per case the paths alternate call by call in one process (≥ 20 calls each,
≥ 2 s in all, median ms per call), `--threads` torch threads (default 2):
  logprobs before  the nucleus by `torch.sort` of whole rows + softmax + cumsum (`sorted_logprobs` below: the code of
                   `processed_logprobs` before the probe), then log_softmax
  logprobs now     `processed_logprobs` (`nucleus_drop`: a `topk` probe of 1,024 tokens, the full sort only when a
                   row's probe holds less than top-p)
  multinomial      `torch.multinomial(logp.exp(), 1)`, the draw before
  inverse CDF      `sampling.draw`
`nucleus_tokens_differing` counts the tokens one way keeps and the other drops (over the 8 rows): boundary tokens
whose mass before them is top-p within float rounding (the two sum the probabilities in different orders).
`step before` = logprobs before + multinomial, `step now` = logprobs now + inverse CDF: what `sample_step` costs per
generated token besides the model's forward.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch
from _common import alternate, main, print_table, save

B = 8


def sorted_logprobs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) log-probs of the top-p nucleus found by sorting whole rows (the code before the probe)."""
    scores = logits.float()
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        drop_sorted = torch.cumsum(probs, dim=-1) - probs >= top_p
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def median_ms(fns: dict[str, Callable[[], object]], min_calls: int, min_s: float) -> dict[str, float]:
    """Median wall ms per call of each function, the calls alternating (`_common.alternate`)."""
    return {name: 1000 * statistics.median(t["time_s"] for t in reps)
            for name, reps in alternate(fns, min_calls, min_s).items()}


def benchmark(args: argparse.Namespace) -> None:
    from opd_agents.rollout.sampling import SamplingParams, draw, processed_logprobs

    torch.set_num_threads(args.threads)
    min_calls, min_s = (5, 0.2) if args.quick else (20, 2.0)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for vocab in (506, 152_064):
        for std in (3.0, 6.0):
            logits = torch.randn(B, vocab, generator=gen) * std
            for top_p in (1.0, 0.9):
                params = SamplingParams(top_p=top_p)
                logp = processed_logprobs(logits, params)
                before = sorted_logprobs(logits, top_p)
                ms = median_ms({"logprobs_before": partial(sorted_logprobs, logits, top_p),
                                "logprobs_now": partial(processed_logprobs, logits, params),
                                "multinomial": partial(torch.multinomial, logp.exp(), 1, generator=gen),
                                "inverse_cdf": partial(draw, logp, gen)}, min_calls, min_s)
                rows.append({"vocab": vocab, "logit_std": std, "top_p": top_p, "ms": ms,
                             "nucleus_tokens": statistics.median(torch.isfinite(logp).sum(-1).tolist()),
                             # kept by one way only: boundary tokens, where the two mass sums round differently
                             "nucleus_tokens_differing": int((torch.isinf(logp) != torch.isinf(before)).sum()),
                             "step_before_ms": ms["logprobs_before"] + ms["multinomial"],
                             "step_now_ms": ms["logprobs_now"] + ms["inverse_cdf"]})
    save("sampler" + ("_quick" if args.quick else ""), {"batch": B, "threads": args.threads, "rows": rows})
    table = []
    for r in rows:
        ms = r["ms"]
        table.append([r["vocab"], r["logit_std"], r["top_p"], r["nucleus_tokens"], r["nucleus_tokens_differing"],
                      ms["logprobs_before"], ms["logprobs_now"], ms["multinomial"], ms["inverse_cdf"],
                      r["step_before_ms"], r["step_now_ms"], r["step_before_ms"] / r["step_now_ms"]])
    print_table(f"one decoding step's sampling, B = {B}, {args.threads} threads (median ms per call)",
                ["V", "logit std", "top-p", "nucleus (median)", "tokens differing", "logprobs before",
                 "logprobs now", "multinomial", "inverse CDF", "step before", "step now", "before / now"], table)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the machine's cores)")


if __name__ == "__main__":
    main(__doc__, benchmark, add_args=add_args)
