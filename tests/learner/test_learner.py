"""Learner: OPD updates move the student toward the teacher; micro-batching is exact; bad steps are skipped."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.config import build_config
from opd_agents.learner.batching import episode_mini_batches, micro_batches
from opd_agents.learner.learner import Learner, lr_lambda
from opd_agents.samples import Sample, TeacherTopK


def _cfg(model_dir, **over):
    data = {
        "run": {"name": "t", "steps": 10, "device": "cpu"},
        "student": {"path": str(model_dir)},
        "teachers": {"t": {"model": str(model_dir)}},
        "tasks": [{"name": "a", "env_id": "opd/Math-v0", "teacher": "t"}],
        "optim": {"lr": 1e-2, "micro_batch_tokens": 100000},
    }
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def _samples(tokenizer, n=3):
    out = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i} + {i + 1}?"}],
                                               add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(f"\\boxed{{{2 * i + 1}}}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = p_ids + r_ids
        mask = [0] * len(p_ids) + [1] * len(r_ids)
        out.append(Sample(ids, mask, [-1.0 if m else 0.0 for m in mask], task="a"))
    return out


@torch.no_grad()
def _teacher(model, samples, k):
    outs = []
    for s in samples:
        logp = torch.log_softmax(model(torch.tensor([s.input_ids])).logits[0].float(), -1)
        pos = torch.tensor(s.loss_positions())
        rows = logp[pos - 1]
        lp, ids = rows.topk(k, -1)
        outs.append(TeacherTopK(ids, lp, rows.gather(-1, torch.tensor(s.input_ids)[pos].unsqueeze(-1)).squeeze(-1)))
    return outs


def _sharp_teacher(path):
    """The tiny teacher with logits scaled ×8: a peaked distribution, so there is something to learn."""
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _full_kl(learner, teacher_model, samples, k=None):
    """Reverse KL at the loss positions; with k, inside the teacher's top-k renormalised (the paper's objective)."""
    with torch.no_grad():
        kls = []
        for s in samples:
            ids = torch.tensor([s.input_ids])
            pos = torch.tensor(s.loss_positions()) - 1
            ps = torch.log_softmax(learner.model(ids).logits[0], -1)[pos]
            pt = torch.log_softmax(teacher_model(ids).logits[0], -1)[pos]
            if k is not None:
                top = pt.topk(k, -1).indices
                ps, pt = ps.gather(-1, top).log_softmax(-1), pt.gather(-1, top).log_softmax(-1)
            kls.append((ps.exp() * (ps - pt)).sum(-1).mean())
    return float(torch.stack(kls).mean())


def _sampled_gap(learner, teacher_model, samples):
    with torch.no_grad():
        gaps = []
        for s in samples:
            ids = torch.tensor([s.input_ids])
            pos = torch.tensor(s.loss_positions())
            tok = ids[0, pos].unsqueeze(-1)
            ps = torch.log_softmax(learner.model(ids).logits[0], -1)[pos - 1].gather(-1, tok)
            pt = torch.log_softmax(teacher_model(ids).logits[0], -1)[pos - 1].gather(-1, tok)
            gaps.append((pt - ps).abs().mean())
    return float(torch.stack(gaps).mean())


@pytest.mark.parametrize("loss", ["topk_reverse_kl", "sampled_token_opd", "full_reverse_kl"])
def test_updates_move_student_toward_teacher(tiny_model_dirs, tiny_tokenizer, loss):
    cfg = _cfg(tiny_model_dirs["student"], **{"loss.name": loss, "loss.k": 16})
    learner = Learner(cfg, str(tiny_model_dirs["student"]))
    teacher = _sharp_teacher(tiny_model_dirs["teacher"])
    samples = _samples(tiny_tokenizer)
    k = learner.vocab_size if loss == "full_reverse_kl" else 16
    distance = {"sampled_token_opd": _sampled_gap, "full_reverse_kl": _full_kl,
                "topk_reverse_kl": lambda *a: _full_kl(*a, k=16)}[loss]
    before = distance(learner, teacher, samples)
    history = []
    for _ in range(15):
        for s in samples:  # on-policy: the behaviour policy is the current student
            with torch.no_grad():
                lp = torch.log_softmax(learner.model(torch.tensor([s.input_ids])).logits[0], -1)
            s.behaviour_logprobs = [0.0] + lp[:-1].gather(-1,
                                                          torch.tensor(s.input_ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
        history.append(learner.update(samples, _teacher(teacher, samples, k)))
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    assert distance(learner, teacher, samples) < 0.6 * before


def test_micro_batching_equals_one_batch(tiny_model_dirs, tiny_tokenizer):
    samples = _samples(tiny_tokenizer, 4)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"])
    outs = _teacher(teacher, samples, 8)
    params = []
    for budget in (100000, 40):
        learner = Learner(_cfg(tiny_model_dirs["student"], **{"optim.micro_batch_tokens": budget}),
                          str(tiny_model_dirs["student"]))
        assert len(micro_batches(list(range(4)), samples, budget)) == (1 if budget > 1000 else 4)
        learner.optimizer.step = lambda: None  # compare the accumulated gradients themselves
        learner.update(samples, outs)
        params.append({n: p.grad.clone() for n, p in learner.model.named_parameters()})
    for key in params[0]:
        torch.testing.assert_close(params[0][key], params[1][key], rtol=1e-4, atol=1e-7)


def test_mini_batches_make_several_optimizer_steps(tiny_model_dirs, tiny_tokenizer):
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"optim.mini_batch_size": 2}), str(tiny_model_dirs["student"]))
    samples = _samples(tiny_tokenizer, 4)
    metrics = learner.update(samples, _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]),
                                               samples, 4))
    assert metrics["optimizer_steps"] == 2 and learner.scheduler.last_epoch == 2


def test_mini_batch_size_counts_episodes_and_keeps_an_episodes_turns_together(tiny_model_dirs, tiny_tokenizer):
    """The rule: `optim.mini_batch_size` counts episodes; per-turn samples of one episode are one unit."""
    samples = _samples(tiny_tokenizer, 10)
    turns = [3, 1, 4, 2]  # 4 per-turn episodes of 3, 1, 4 and 2 samples
    for i, s in enumerate(samples):
        s.episode_id = f"ep{sum(i >= sum(turns[:j + 1]) for j in range(len(turns)))}"
    assert episode_mini_batches(samples, 2) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert episode_mini_batches(samples, 3) == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    assert episode_mini_batches(samples, 0) == [list(range(10))]
    one_turn = _samples(tiny_tokenizer, 5)  # no episode ids (or one sample per episode): each sample is one
    assert episode_mini_batches(one_turn, 2) == [[0, 1], [2, 3], [4]]
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"optim.mini_batch_size": 2}), str(tiny_model_dirs["student"]))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"])
    assert learner.update(samples, _teacher(teacher, samples, 4))["optimizer_steps"] == 2  # 4 episodes, not 10
    assert learner.optimizer_steps_per_update(4) == 2


def test_lr_scale_steps_as_a_scaled_rate_and_leaves_the_schedule_alone(tiny_model_dirs, tiny_tokenizer):
    samples = _samples(tiny_tokenizer, 2)
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 4)
    scaled = Learner(_cfg(tiny_model_dirs["student"], **{"optim.lr": 1e-3}), str(tiny_model_dirs["student"]))
    plain = Learner(_cfg(tiny_model_dirs["student"], **{"optim.lr": 3e-3}), str(tiny_model_dirs["student"]))
    metrics = scaled.update(samples, outs, lr_scale=3.0)
    plain.update(samples, outs)
    assert metrics["lr"] == pytest.approx(3e-3)
    assert scaled.scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # the next step starts from the unscaled rate
    for (name, got), want in zip(scaled.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=name)


def test_nonfinite_updates_are_skipped_then_stop(tiny_model_dirs, tiny_tokenizer):
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"optim.max_bad_steps": 2}), str(tiny_model_dirs["student"]))
    samples = _samples(tiny_tokenizer, 2)
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 4)
    before = copy.deepcopy(learner.model.state_dict())
    for o in outs:
        o.topk_logprobs[:] = float("nan")
    metrics = learner.update(samples, outs)
    assert metrics["skipped"] == 1.0 and learner.skipped_steps == 1
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(FloatingPointError, match="max_bad_steps"):
        learner.update(samples, outs)


def test_lr_schedule_shapes():
    assert lr_lambda(0, 4, 100, "constant", 0.0) == 0.25
    assert lr_lambda(10, 0, 100, "constant", 0.0) == 1.0
    assert lr_lambda(100, 0, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(50, 0, 100, "linear", 0.0) == pytest.approx(0.5)
