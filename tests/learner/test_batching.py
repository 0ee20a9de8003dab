"""Micro-batch packing: the least padded tokens plus a fixed cost per micro-batch — at most 1.1× the real tokens on the
GPU review's long-tailed length mix (arrival order pads 1.2-1.7×) and on the default config's per-turn ALFWorld
samples — and an update that equals the arrival-order one."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner import batching
from opd_agents.learner.batching import micro_batches, padding_ratio
from opd_agents.learner.learner import Learner
from opd_agents.samples import Sample
from tests.learner.test_learner import _cfg, _samples, _teacher


def _arrival_order(idx: list[int], samples: list[Sample], budget: int) -> list[list[int]]:
    """The previous packing: greedy, in arrival order."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in idx:
        n = len(samples[i].input_ids)
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return out + ([cur] if cur else [])


def _of_lengths(lengths) -> list[Sample]:
    return [Sample([1] * int(n), [0] * int(n), [0.0] * int(n), task="t") for n in lengths]


@pytest.mark.parametrize("median", [3000, 8000])
def test_padding_on_the_reviews_long_tailed_mix(median):
    """64 samples, lognormal response lengths (σ = 0.8) capped at 15,360, a 200-token prompt, 32K-token budget."""
    rng = np.random.default_rng(0)
    samples = _of_lengths(np.minimum(rng.lognormal(np.log(median), 0.8, 64), 15360).astype(int) + 200)
    idx = list(range(64))
    packed, arrival = micro_batches(idx, samples, 32768), _arrival_order(idx, samples, 32768)
    assert padding_ratio(packed, samples) <= 1.1 < 1.2 <= padding_ratio(arrival, samples)
    assert sorted(i for g in packed for i in g) == idx
    assert all(len(g) * max(len(samples[i].input_ids) for i in g) <= 32768 or len(g) == 1 for g in packed)


def test_the_default_configs_per_turn_samples_pad_at_most_10_percent():
    """A default ALFWorld step: 80 per-turn samples, most 78-115 tokens and a few 150-216, an 8,192-token budget."""
    rng = np.random.default_rng(0)
    samples = _of_lengths(np.concatenate([rng.integers(78, 116, 71), rng.integers(150, 217, 9)]))
    assert padding_ratio(micro_batches(list(range(80)), samples, 8192), samples) <= 1.1


def test_the_packing_is_the_cheapest_split_by_brute_force():
    lengths = [9, 3, 7, 7, 2, 5, 8, 1]
    samples = _of_lengths(lengths)
    budget = 16
    got = micro_batches(list(range(8)), samples, budget)

    def cost(groups):
        return sum(len(g) * max(lengths[i] for i in g) for g in groups) + batching.MICRO_BATCH_COST * budget * len(
            groups)

    order = sorted(range(8), key=lambda i: (-lengths[i], i))
    best = None
    for cuts in itertools.product([0, 1], repeat=7):  # every contiguous split of the length-sorted order
        groups, cur = [], [order[0]]
        for cut, i in zip(cuts, order[1:]):
            if cut:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        if all(len(g) * max(lengths[i] for i in g) <= budget or len(g) == 1 for g in groups):
            best = cost(groups) if best is None else min(best, cost(groups))
    assert cost(got) == pytest.approx(best)


def test_the_packed_update_equals_the_arrival_order_update(tiny_model_dirs, tiny_tokenizer, monkeypatch):
    samples = _samples(tiny_tokenizer, 6)
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 8)
    weights, metrics = [], []
    for packer in (micro_batches, _arrival_order):
        monkeypatch.setattr(batching, "micro_batches", packer)
        monkeypatch.setattr("opd_agents.learner.learner.micro_batches", packer)
        learner = Learner(_cfg(tiny_model_dirs["student"], **{"optim.micro_batch_tokens": 90}),
                          str(tiny_model_dirs["student"]))
        metrics.append(learner.update(samples, outs))
        weights.append({k: v.clone() for k, v in learner.model.state_dict().items()})
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], abs=1e-6)
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[0][key], value, rtol=0, atol=1e-6)
    assert metrics[0]["padding_ratio"] <= metrics[1]["padding_ratio"]
