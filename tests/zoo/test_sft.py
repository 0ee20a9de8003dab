"""The zoo's SFT loop: loss masking, and that it learns a trivial task in a few seconds."""
from __future__ import annotations

import math

import pytest
import torch

from opd_agents.zoo.models import TinySize, build_tiny_model
from opd_agents.zoo.scoring import greedy
from opd_agents.zoo.sft import IGNORE, Pair, SFTConfig, _lr_factor, tokenize_pair, train_sft
from opd_agents.zoo.tokenizer import train_tokenizer

# Successor mod 10: "3" -> "4". Each digit is its own token, so this is a pure lookup the smallest model learns.
PAIRS = [Pair(({"role": "user", "content": str(d)},), str((d + 1) % 10)) for d in range(10)]


def _tokenizer():
    return train_tokenizer([f"{d} {d}" for d in range(10)] * 3, vocab_size=280)


def test_tokenize_pair_masks_the_prompt_and_ends_with_eos():
    tok = _tokenizer()
    example = tokenize_pair(tok, PAIRS[3])
    answer = [i for i in example.labels if i != IGNORE]
    assert tok.decode(answer) == "4<|im_end|>"
    assert answer[-1] == tok.eos_token_id == example.input_ids[-1]
    prompt_len = example.labels.index(answer[0])
    assert tok.decode(example.input_ids[:prompt_len]).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE for label in example.labels[:prompt_len])


def test_sft_reduces_loss_and_learns_a_trivial_task():
    tok = _tokenizer()
    model = build_tiny_model(tok, TinySize(2, 64, 2, 1, 128), seed=0)
    examples = [tokenize_pair(tok, p) for p in PAIRS]
    config = SFTConfig(lr=3e-3, warmup_steps=10, batch_size=10, max_steps=300, time_budget_s=120, seed=0)
    result = train_sft(model, tok, examples, config)
    assert result.steps == 300
    assert sum(result.losses[-10:]) / 10 < 0.1 * sum(result.losses[:5]) / 5
    answers = greedy(model, tok, [p.messages for p in PAIRS], max_new_tokens=4)
    assert answers == [p.response for p in PAIRS]


def test_sft_is_deterministic_by_seed_and_stops_at_the_time_budget():
    tok = _tokenizer()
    examples = [tokenize_pair(tok, p) for p in PAIRS]
    runs = []
    for _ in range(2):
        model = build_tiny_model(tok, TinySize(1, 32, 2, 1, 64), seed=0)
        runs.append(train_sft(model, tok, examples, SFTConfig(max_steps=8, time_budget_s=60, batch_size=4)).losses)
    assert runs[0] == runs[1]
    model = build_tiny_model(tok, TinySize(1, 32, 2, 1, 64), seed=0)
    timed = train_sft(model, tok, examples, SFTConfig(max_steps=10**6, time_budget_s=0.5, batch_size=4))
    assert 0 < timed.steps < 10**6 and timed.seconds < 5 and timed.budget_bound
    assert not model.training and torch.is_grad_enabled()
    assert not train_sft(model, tok, examples, SFTConfig(max_steps=2, time_budget_s=60, batch_size=4)).budget_bound


def test_sft_rate_schedule_follows_the_step_alone():
    config = SFTConfig(lr=1.0, warmup_steps=4, max_steps=100, min_lr_ratio=0.1)
    factors = [_lr_factor(step, config) for step in range(101)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.04)))
    assert factors[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[4:], factors[5:]))


def _prompt_nll(model, batch, rows):
    """Brute force: mean next-token NLL over the real (non-pad) prompt positions of ``rows``."""
    logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    nll = [-logp[row, t, batch["input_ids"][row, t + 1]]
           for row in rows for t in range(int(batch["attention_mask"][row].sum()) - 1)
           if batch["labels"][row, t + 1] == IGNORE]
    return torch.stack(nll).mean()


def test_prompt_loss_weight_adds_the_prompt_tokens_and_reports_the_response_loss():
    from opd_agents.zoo.sft import _collate, _loss

    tok = _tokenizer()
    model = build_tiny_model(tok, TinySize(1, 32, 2, 1, 64), seed=0)
    batch = _collate([tokenize_pair(tok, p) for p in PAIRS[:4]], tok.pad_token_id)
    plain, plain_reported = _loss(model, batch, 0.0)
    weighted, reported = _loss(model, batch, 0.5)
    torch.testing.assert_close(reported, plain)  # HF's loss: mean over response tokens
    assert plain_reported is plain
    torch.testing.assert_close(weighted, plain + 0.5 * _prompt_nll(model, batch, range(4)))


def test_prompt_loss_covers_only_the_rows_that_take_it():
    from opd_agents.zoo.sft import _collate, _loss

    tok = _tokenizer()
    model = build_tiny_model(tok, TinySize(1, 32, 2, 1, 64), seed=0)
    examples = [tokenize_pair(tok, p, prompt_loss=row % 2 == 0) for row, p in enumerate(PAIRS[:4])]
    batch = _collate(examples, tok.pad_token_id)
    plain, _ = _loss(model, batch, 0.0)
    weighted, reported = _loss(model, batch, 0.5)
    torch.testing.assert_close(reported, plain)
    torch.testing.assert_close(weighted, plain + 0.5 * _prompt_nll(model, batch, (0, 2)))
    none = _collate([tokenize_pair(tok, p, prompt_loss=False) for p in PAIRS[:4]], tok.pad_token_id)
    only_response, _ = _loss(model, none, 0.5)
    torch.testing.assert_close(only_response, _loss(model, none, 0.0)[0])
