"""One decoding step's sampling on CPU, before and after `StepSampler`, side by side, with glibc malloc's default and
with the mmap threshold the trainer pins (`ray.malloc_mmap_threshold_kib`, opd_agents/malloc.py).

    python benchmarks/sampler.py [--quick] [--threads N]
B = 8 rows of random logits, normal with std 0.05 ("flat", like a random-init model's: a top-p 0.9 nucleus of ~90 % of
the vocabulary, found by a full sort), std 3 ("wide": at V = 152,064 a nucleus of ~7k tokens, more than a 1,024-token
probe holds) or std 6 ("peaked": a few to tens of tokens, like a trained model's);
V = 506 (the env-text tokenizer) and V = 152,064 (Qwen2.5's vocabulary); top-p 1.0 (the TRL step benchmark's
setting) and 0.9 (the default config's). Per case both paths alternate call by call in one process (≥ 20 calls each,
≥ 2 s in all, median ms per call), `--threads` torch threads (default 2); each malloc setting is a fresh process:
  before  the step before `StepSampler` (`previous_step` below): a softmax for a 1,024-token nucleus probe (else a
          full sort), a (B, V) bool mask, a masked `log_softmax`, then the inverse CDF over a (B, V) float64 cumsum —
          four (top-p 1) to six (top-p < 1) fresh (B, V) buffers a step
  now     one `StepSampler` called step after step, as `HFPolicy.generate` does: exp into its kept (B, V) buffer, the
          nucleus found by probes of 1,024 then 16,384 tokens (else a full sort) and drawn among those candidates, a
          whole row drawn in two levels (block, then token)
`tokens differing` counts the tokens one path keeps in the nucleus and the other drops (over the 8 rows): boundary
tokens whose mass before them is top-p within float rounding (the two sum the probabilities in different orders).
"""
from __future__ import annotations

import argparse
import statistics
from functools import partial
from typing import Any

import torch
from _common import alternate, main, print_table, run_case, save

B = 8
MALLOC = {"glibc default": None, "pinned 1 MiB": 1024}


def previous_step(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits → ((B,) ids, (B, V) log-probs): the sampling step before `StepSampler` (temperature 1)."""
    scores = logits.float()
    if top_p < 1.0:
        row_probs = torch.softmax(scores, dim=-1)
        probs, order = torch.topk(row_probs, min(1024, scores.shape[-1]), dim=-1)
        mass = torch.cumsum(probs, dim=-1)
        if not bool((mass[:, -1] >= top_p).all()):
            probs, order = torch.sort(row_probs, dim=-1, descending=True)
            mass = torch.cumsum(probs, dim=-1)
        drop = torch.ones_like(scores, dtype=torch.bool).scatter(-1, order, (mass - probs) >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    cdf = torch.cumsum(logp.exp(), dim=-1, dtype=torch.float64)
    u = torch.rand(cdf[:, -1:].shape, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1), logp


def measure(case: dict[str, Any]) -> dict[str, Any]:
    from opd_agents import malloc
    from opd_agents.sampling import SamplingParams, StepSampler, processed_logprobs

    pinned = malloc.pin_mmap_threshold(case["malloc_kib"])
    torch.set_num_threads(case["threads"])
    gen = torch.Generator().manual_seed(0)
    rows = []
    for vocab in (506, 152_064):
        for std in (0.05, 3.0, 6.0):
            logits = torch.randn(B, vocab, generator=gen) * std
            for top_p in (1.0, 0.9):
                params = SamplingParams(top_p=top_p)
                now, before = processed_logprobs(logits, params), previous_step(logits, top_p, gen)[1]
                reps = alternate({"before": partial(previous_step, logits, top_p, gen),
                                  "now": partial(StepSampler(params, gen), logits)}, case["min_calls"], case["min_s"])
                ms = {k: 1000 * statistics.median(t["time_s"] for t in v) for k, v in reps.items()}
                rows.append({"vocab": vocab, "logit_std": std, "top_p": top_p, "ms": ms,
                             "nucleus_tokens": statistics.median(torch.isfinite(now).sum(-1).tolist()),
                             "nucleus_tokens_differing": int((torch.isinf(now) != torch.isinf(before)).sum())})
    return {"pinned": pinned, "rows": rows}


def benchmark(args: argparse.Namespace) -> None:
    min_calls, min_s = (5, 0.2) if args.quick else (20, 2.0)
    results = {name: run_case(__file__, {"malloc_kib": kib, "threads": args.threads, "min_calls": min_calls,
                                         "min_s": min_s}) for name, kib in MALLOC.items()}
    save("sampler" + ("_quick" if args.quick else ""), {"batch": B, "threads": args.threads, "malloc": results})
    table = []
    for name, result in results.items():
        for r in result.get("rows", []):
            ms = r["ms"]
            table.append([name, r["vocab"], r["logit_std"], r["top_p"], r["nucleus_tokens"],
                          r["nucleus_tokens_differing"], ms["before"], ms["now"], ms["before"] / ms["now"]])
    print_table(f"one decoding step's sampling, B = {B}, {args.threads} threads (median ms per call)",
                ["malloc", "V", "logit std", "top-p", "nucleus (median)", "tokens differing", "before", "now",
                 "before / now"], table)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the machine's cores)")


if __name__ == "__main__":
    main(__doc__, benchmark, measure, add_args=add_args)
