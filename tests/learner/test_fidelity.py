"""The signal-fidelity probe on crafted cases, with what is mathematically true of each:
- the renormalised top-K loss's logit gradient tends to the full reverse-KL's as K → V, and is it at K = V;
- a top-K KL used as a detached advantage (a per-position reward that does not depend on the sampled token) has zero
  expected gradient: its cosine with the reference averages to 0 and shrinks like 1/sqrt(N) with the positions;
- the sampled-token log-ratio advantage (REINFORCE, the baseline on-policy) is by contrast an unbiased estimate of the
  reference gradient: one draw has a clearly positive cosine, the mean over draws tends to cosine 1;
- without renormalisation the truncated loss drifts at small K: lower cosine than renormalised, negative at K = 1;
and the learner's hook runs the registered loss on a real tiny model's logits."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner import losses
from opd_agents.learner.fidelity import signal_fidelity
from opd_agents.learner.learner import Learner
from tests.learner.test_learner import _cfg, _samples, _teacher

D = torch.float64
N, V = 512, 200


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits and teacher log-probs (N, V): peaked, correlated distributions (the teacher sharper)."""
    g = torch.Generator().manual_seed(seed)
    base = 2.5 * torch.randn(N, V, generator=g, dtype=D)
    student = base + 0.8 * torch.randn(N, V, generator=g, dtype=D)
    teacher = torch.log_softmax(1.5 * base + 0.8 * torch.randn(N, V, generator=g, dtype=D), -1)
    return student, teacher


EVERY = torch.ones(N, dtype=torch.bool)


def _topk_loss(teacher: torch.Tensor, k: int, renormalize: bool = True):
    ids = teacher.topk(k, -1).indices

    def loss(z: torch.Tensor):
        s = z.gather(-1, ids) if renormalize else torch.log_softmax(z, -1).gather(-1, ids)
        return losses.truncated_reverse_kl(s, teacher.gather(-1, ids), EVERY, renormalize=renormalize,
                                           student_is_logits=renormalize)
    return loss


def _sampled(student: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.multinomial(torch.softmax(student, -1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]


def _detached_kl_advantage(teacher: torch.Tensor, k: int, y: torch.Tensor):
    """−A·log p(y) with A = −(top-K reverse-KL at the position), detached: the KL as a reward."""
    ids = teacher.topk(k, -1).indices

    def loss(z: torch.Tensor):
        s, t = torch.log_softmax(z.gather(-1, ids), -1), torch.log_softmax(teacher.gather(-1, ids), -1)
        advantage = -(s.exp() * (s - t)).sum(-1).detach()
        return -(advantage * torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]).mean(), {}
    return loss


def _log_ratio_advantage(teacher: torch.Tensor, y: torch.Tensor):
    """Sampled-token OPD on-policy (behaviour = the student, ratio 1): A = log p_T(y) − log p_S(y), detached."""
    def loss(z: torch.Tensor):
        lp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]
        return losses.sampled_token_opd(lp, lp.detach(), teacher.gather(-1, y[:, None])[:, 0], EVERY)
    return loss


def test_renormalised_topk_tends_to_the_reference_and_is_it_at_k_equal_v():
    student, teacher = _case()
    cosines = [signal_fidelity(student, teacher, _topk_loss(teacher, k))["cosine"] for k in (4, 16, 64, 128)]
    assert cosines == sorted(cosines) and cosines[0] < 0.6 and cosines[-1] > 0.999
    exact = signal_fidelity(student, teacher, _topk_loss(teacher, V))
    assert exact["cosine"] == pytest.approx(1.0, abs=1e-12) and exact["rel_norm"] == pytest.approx(1.0, abs=1e-10)
    assert exact["position_cosine"] == pytest.approx(1.0, abs=1e-10) and exact["zero_grad_frac"] == 0.0
    point = signal_fidelity(student, teacher, _topk_loss(teacher, 1))  # a point mass for both: no signal at all
    assert point["zero_grad_frac"] == 1.0 and point["cosine"] == 0.0 and point["rel_norm"] == 0.0


def test_a_detached_kl_advantage_has_zero_expected_cosine():
    student, teacher = _case()
    cosines = torch.tensor([signal_fidelity(student, teacher, _detached_kl_advantage(teacher, 8, _sampled(student, s))
                                            )["cosine"] for s in range(60)], dtype=D)
    assert abs(float(cosines.mean())) < 3 * float(cosines.std()) / math.sqrt(len(cosines))
    assert float(cosines.abs().max()) < 6 / math.sqrt(N)  # O(1/sqrt(N)): no direction survives many positions


def test_a_sampled_token_log_ratio_advantage_is_unbiased():
    student, teacher = _case()
    draws = [_sampled(student, s) for s in range(200)]
    one = [signal_fidelity(student, teacher, _log_ratio_advantage(teacher, y))["cosine"] for y in draws[:5]]
    assert min(one) > 0.15  # a single draw: noisy but aligned, whatever N

    def mean_over_draws(z: torch.Tensor):
        return torch.stack([_log_ratio_advantage(teacher, y)(z)[0] for y in draws]).mean(), {}
    assert signal_fidelity(student, teacher, mean_over_draws)["cosine"] > 0.95


def test_without_renormalisation_the_truncated_loss_drifts_at_small_k():
    student, teacher = _case()
    for k in (2, 4, 8, 16):
        renorm = signal_fidelity(student, teacher, _topk_loss(teacher, k))["cosine"]
        plain = signal_fidelity(student, teacher, _topk_loss(teacher, k, renormalize=False))["cosine"]
        assert plain < renorm - 0.05
    # K = 1: p(log p − log q) is minimised by lowering p wherever p/q > 1/e, even where the teacher wants more mass.
    assert signal_fidelity(student, teacher, _topk_loss(teacher, 1, renormalize=False))["cosine"] < 0
    assert signal_fidelity(student, teacher, _topk_loss(teacher, V, renormalize=False))["cosine"] == pytest.approx(1.0)


def test_clip_fraction_is_reported_where_the_loss_clips():
    student, teacher = _case()
    ids = teacher.topk(8, -1).indices

    def clipped(z: torch.Tensor):
        return losses.truncated_reverse_kl(z.gather(-1, ids), teacher.gather(-1, ids), EVERY, student_is_logits=True,
                                           log_ratio_clip=0.5)
    metrics = signal_fidelity(student, teacher, clipped)
    assert 0 < metrics["clip_fraction"] < 1 and "clip_fraction" not in signal_fidelity(student, teacher,
                                                                                        _topk_loss(teacher, 8))


@torch.no_grad()
def _on_policy(samples, model):
    """The samples with the student's own log-probs as behaviour (the rollout policy is the current student)."""
    for s in samples:
        logp = torch.log_softmax(model(torch.tensor([s.input_ids])).logits[0].float(), -1)
        pos = torch.tensor(s.loss_positions())
        lp = logp[pos - 1].gather(-1, torch.tensor(s.input_ids)[pos, None])[:, 0]
        s.behaviour_logprobs = [0.0] * len(s.input_ids)
        for t, v in zip(pos.tolist(), lp.tolist()):
            s.behaviour_logprobs[t] = v
    return samples


@pytest.mark.parametrize("case", ["topk", "k1", "sampled_recomputed", "sampled_on_policy", "sampled_off_policy"])
def test_learner_probe_runs_the_registered_loss(tiny_model_dirs, tiny_tokenizer, case):
    samples = _samples(tiny_tokenizer, 3)  # behaviour log-probs -1.0: far off the student's own
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"])
    # sampled_recomputed (the default old policy) ignores the rollout's log-probs; the other two read them.
    over = {"k1": {"loss.k": 1}, "sampled_recomputed": {"loss.name": "sampled_token_opd"}}.get(
        case, {"loss.name": "sampled_token_opd", "loss.old_logprob": "rollout"} if case.startswith("sampled") else {})
    learner = Learner(_cfg(tiny_model_dirs["student"], **{"loss.k": 8, **over}), str(tiny_model_dirs["student"]))
    if case == "sampled_on_policy":
        samples = _on_policy(samples, learner.model)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    full = _teacher(teacher, samples, learner.vocab_size)
    metrics = learner.probe_fidelity(samples, _teacher(teacher, samples, learner.cfg.loss.k), full, seed=3)
    assert metrics["num_positions"] == sum(s.num_loss_tokens for s in samples)
    assert all(math.isfinite(v) for v in metrics.values())
    if case in ("k1", "sampled_off_policy"):  # no signal: a point-mass support, or the PPO clip active everywhere
        assert metrics["zero_grad_frac"] == 1.0 and metrics["cosine"] == 0.0
        assert case == "k1" or metrics["clip_fraction"] == 1.0
    else:
        assert metrics["cosine"] > 0 and metrics["zero_grad_frac"] == 0.0, metrics
    assert all(p.grad is None for p in learner.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())
    if case == "topk":  # K = V: the configured loss is the reference
        assert learner.probe_fidelity(samples, full, full, seed=3)["cosine"] == pytest.approx(1.0, abs=1e-5)
