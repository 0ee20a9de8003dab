"""The old-policy pass of sampled-token OPD (the paper's code, verl's `compute_log_prob` before `update_policy`):
the advantage and PPO ratio use the student's full-vocabulary log-prob recomputed once before the update's first
optimizer step, not the rollout's top-p processed log-prob; per-sample entropy selection reads the same pass.

Every expectation is computed independently: a plain forward of a copy of the student taken before the update."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner import losses
from opd_agents.learner.learner import Learner
from tests.learner.test_learner import _cfg, _samples, _teacher


@torch.no_grad()
def _reference(model, samples) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: the model's full-vocabulary log-prob of each loss token and the entropy there, (N,) each."""
    out = []
    for s in samples:
        logp = torch.log_softmax(model(torch.tensor([s.input_ids])).logits[0].double(), -1)
        pos = torch.tensor(s.loss_positions())
        rows = logp[pos - 1]
        out.append((rows.gather(-1, torch.tensor(s.input_ids)[pos, None])[:, 0], -(rows.exp() * rows).sum(-1)))
    return out


@pytest.fixture()
def setup(tiny_model_dirs, tiny_tokenizer):
    samples = _samples(tiny_tokenizer, 4)  # rollout (behaviour) log-probs -1.0: far from the student's own
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 8)
    return samples, outs


def test_with_one_mini_batch_the_ratio_is_exactly_one_and_the_advantage_is_teacher_minus_student(
        tiny_model_dirs, setup):
    samples, outs = setup
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"loss.name": "sampled_token_opd"}),
                      str(tiny_model_dirs["student"]))
    expected = _reference(copy.deepcopy(learner.model), samples)
    metrics = learner.update(samples, outs)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
    advantage = torch.cat([o.sampled_logprobs.double() - lp for o, (lp, _) in zip(outs, expected)])
    assert metrics["advantage_mean"] == pytest.approx(advantage.mean().item(), abs=1e-5)

    rollout = Learner(_cfg(tiny_model_dirs["student"], **{"loss.name": "sampled_token_opd",
                                                            "loss.old_logprob": "rollout"}),
                      str(tiny_model_dirs["student"]))
    off = rollout.update(samples, outs)  # the old behaviour: ratio and advantage against the rollout's -1.0
    assert off["ratio_max"] > 1.0 or off["ratio_min"] < 1.0
    behaviour = torch.cat([o.sampled_logprobs.double() + 1.0 for o in outs])
    assert off["advantage_mean"] == pytest.approx(behaviour.mean().item(), abs=1e-5)


def test_the_old_policy_is_computed_once_before_the_first_optimizer_step(tiny_model_dirs, setup, monkeypatch):
    samples, outs = setup
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"loss.name": "sampled_token_opd",
                                                          "optim.mini_batch_size": 2}),
                      str(tiny_model_dirs["student"]))
    expected = _reference(copy.deepcopy(learner.model), samples)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    inner = losses.sampled_token_opd

    def spy(student, old, teacher, mask, **kw):
        seen.append((student.detach().clone(), old.detach().clone(), mask.clone()))
        return inner(student, old, teacher, mask, **kw)

    monkeypatch.setattr(losses, "sampled_token_opd", spy)
    calls = []
    monkeypatch.setattr(learner, "_old_policy", lambda *a: calls.append(1) or Learner._old_policy(learner, *a))
    learner.update(samples, outs)
    assert len(calls) == 1 and len(seen) == 2  # one pass, two optimizer steps of two samples each
    for step, (student, old, mask) in enumerate(seen):
        ref = torch.nn.utils.rnn.pad_sequence([lp for lp, _ in expected[2 * step: 2 * step + 2]], batch_first=True)
        torch.testing.assert_close(old[mask].double(), ref[mask], rtol=0, atol=1e-5)
        # Step 1 is on-policy (ratio 1 exactly); step 2 runs after an optimizer step: its student has moved.
        assert torch.equal(student[mask], old[mask]) == (step == 0)


@pytest.mark.parametrize("name", ["sampled_token_opd", "topk_reverse_kl"])
def test_per_sample_entropy_selection_trains_each_samples_top_tokens(tiny_model_dirs, setup, name):
    samples, outs = setup
    ratio = 0.5
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"loss.name": name, "loss.entropy_top_ratio": ratio}),
                      str(tiny_model_dirs["student"]))
    expected = _reference(copy.deepcopy(learner.model), samples)
    kept = 0
    for _, entropy in expected:  # the paper's rule per sample: max(1, ⌊r·n⌋), ties kept (none here: float entropies)
        k = max(1, int(ratio * entropy.numel()))
        kept += int((entropy >= entropy.sort(descending=True).values[k - 1]).sum())
    assert learner.update(samples, outs)["tokens"] == kept
    pooled = Learner(_cfg(tiny_model_dirs["student"], **{"loss.name": name, "loss.entropy_top_ratio": ratio,
                                                         "loss.entropy_selection": "pooled"}),
                     str(tiny_model_dirs["student"]))
    total = sum(e.numel() for _, e in expected)
    assert pooled.update(samples, outs)["tokens"] == -(-total // 2)  # ⌈r·n⌉ over the whole mini-batch
