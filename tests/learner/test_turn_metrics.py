"""Per-turn metrics for agent tasks: each loss position's turn (per-turn samples or a conversation's response spans),
KL / gap / support mass by turn in the losses, and micro-batches combined by each subset's own tokens."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner import losses
from opd_agents.learner.batching import collate, loss_turns, micro_batches
from opd_agents.learner.learner import Learner
from opd_agents.learner.metric_sums import accumulate_metrics, finish_metrics
from opd_agents.samples import Sample
from tests.learner.test_learner import _cfg, _teacher


def _conversation(tokenizer, turns: int, seed: int) -> Sample:
    """A conversation of `turns` responses separated by environment text (masked), with its response spans."""
    ids, mask, spans = tokenizer("You are in a room.", add_special_tokens=False)["input_ids"], [], []
    mask = [0] * len(ids)
    for k in range(turns):
        response = tokenizer(f"<action>go to cabinet {seed + k}</action>", add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(response)))
        ids, mask = ids + response, mask + [1] * len(response)
        obs = tokenizer(f"Nothing happens {k}.", add_special_tokens=False)["input_ids"]
        ids, mask = ids + obs, mask + [0] * len(obs)
    return Sample(ids, mask, [-1.0 if m else 0.0 for m in mask], task="a", turn_spans=spans)


def test_loss_turns_from_metadata_or_spans():
    s = Sample(list(range(10)), [0, 1, 1, 0, 0, 1, 1, 1, 0, 1], [0.0] * 10, task="a",
               turn_spans=[(1, 3), (5, 8)])
    assert loss_turns(s).tolist() == [0, 0, 1, 1, 1, -1]  # the last loss token lies outside every span
    s.metadata["turn"] = 4  # one turn of a per-turn episode
    assert loss_turns(s).tolist() == [4] * 6
    assert loss_turns(Sample([1, 2], [0, 1], [0.0, -1.0], task="a")) is None


def test_losses_report_each_turn_with_its_token_count():
    g = torch.Generator().manual_seed(0)
    B, L, K = 2, 40, 6
    student = torch.log_softmax(torch.randn(B, L, K, generator=g, dtype=torch.float64), -1) - 0.5
    teacher = torch.log_softmax(torch.randn(B, L, K, generator=g, dtype=torch.float64), -1) - 0.3
    mask = torch.rand(B, L, generator=g) > 0.2
    turns = torch.arange(L).expand(B, L) // 2  # turns 0 … 19: 16 and later pool
    turns[1, :5] = -1
    _, metrics = losses.truncated_reverse_kl(student, teacher, mask, renormalize=False, turns=turns,
                                             student_logprob=student[..., 0], teacher_logprob=teacher[..., 0])
    per_position = (student.exp() * (student - teacher)).sum(-1)
    for k in (0, 3, 15):
        rows = mask & (turns == k)
        assert metrics[f"kl_mean@turn{k}"] == pytest.approx(float(per_position[rows].mean()))
        gap = teacher[..., 0] - student[..., 0]
        assert metrics[f"gap_mean@turn{k}"] == pytest.approx(float(gap[rows].mean()))
        assert metrics[f"num_tokens@turn{k}"] == float(rows.sum())
    late = mask & (turns >= 16)
    assert metrics["num_tokens@turn16+"] == float(late.sum()) and "kl_mean@turn17" not in metrics
    assert metrics["kl_mean@turn16+"] == pytest.approx(float(per_position[late].mean()))


def test_subset_metrics_weigh_by_their_own_tokens():
    acc: dict[str, float] = {}
    accumulate_metrics(acc, {"num_tokens": 40.0, "kl_mean": 1.0, "kl_mean@turn1": 1.0, "num_tokens@turn1": 10.0}, 0.5)
    accumulate_metrics(acc, {"num_tokens": 40.0, "kl_mean": 3.0, "kl_mean@turn1": 2.0, "num_tokens@turn1": 30.0}, 0.5)
    got = finish_metrics(acc)
    assert set(got) == {"kl_mean", "kl_mean@turn1"}
    assert got["kl_mean"] == pytest.approx(2.0) and got["kl_mean@turn1"] == pytest.approx((10 + 60) / 40)


@pytest.mark.parametrize("path", ["support", "full"])
def test_learner_turn_metrics_do_not_depend_on_micro_batching(tiny_model_dirs, tiny_tokenizer, path):
    samples = [_conversation(tiny_tokenizer, turns, seed) for seed, turns in enumerate((3, 1, 2, 3))]
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 8)
    assert collate(samples, outs, pad_id=0).turns is not None and len(micro_batches([0, 1, 2, 3], samples, 60)) > 2
    results = []
    for budget in (100000, 60):
        over = {"loss.k": 8, "optim.micro_batch_tokens": budget, "loss.diagnostic_positions": "null",
                "loss.student_logits": path}
        learner = Learner(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
        learner.optimizer.step = lambda: None
        results.append(learner.update(samples, outs))
    one, many = results
    keys = {k for k in one if "@turn" in k}
    assert {"kl_mean@turn0", "kl_mean@turn2", "gap_mean@turn1", "teacher_support_mass@turn2"} <= keys
    assert not any(k.startswith("num_tokens@") for k in one)
    for k in keys | {"gap_mean@0-63", "kl_mean", "entropy"}:
        assert many[k] == pytest.approx(one[k], rel=1e-5), k
