"""The off-policy correction (`off_policy.py`): on an enumerable toy the corrected estimator's expectation under stale
weights equals the on-policy gradient and the uncorrected one does not; the weights' arithmetic by brute force; and in
the learner, samples whose behaviour log-probs are the current weights' own get weight 1 (the update equals the
uncorrected one) while stale ones get the ratio the current weights give them.

The toy: sequences of T = 3 tokens from V = 4, a tabular student (one logit row per prefix), its top-p processed
sampling distribution q_θ (the rollout's arithmetic, `sampling.processed_logprobs`), a tabular teacher, and stale
weights b (θ flattened, plus noise). Every expectation is an exact sum over all V^T sequences, computed in float64."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.config import LossConfig
from opd_agents.learner import losses, off_policy
from opd_agents.learner.learner import Learner
from opd_agents.learner.registry import get_loss
from opd_agents.learner.supports import union_sampled_support
from opd_agents.samples import Sample
from opd_agents.sampling import SamplingParams, processed_logprobs, sample_step
from tests.learner.test_learner import _cfg, _samples, _teacher

V, T, K = 4, 3, 2
PARAMS = SamplingParams(temperature=1.0, top_p=0.9)
SEQS = list(itertools.product(range(V), repeat=T))
PREFIXES = [p for t in range(T) for p in itertools.product(range(V), repeat=t)]
INDEX = {p: i for i, p in enumerate(PREFIXES)}


def _tables(seed: int = 3):
    """θ, stale weights b and the teacher, as (prefixes, V) logit tables. b = 0.7 θ + noise: flatter than θ, so
    that (for this seed) b's nucleus holds every token θ's does, which exactness needs (`_coverage_holds`)."""
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    behaviour = 0.7 * theta.detach() + 0.3 * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    teacher = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 2.0
    return theta, behaviour, teacher


def _processed(logits: torch.Tensor) -> torch.Tensor:
    return processed_logprobs(logits.detach().float(), PARAMS).double()


def _rows(table: torch.Tensor, seq: tuple[int, ...]) -> torch.Tensor:
    """(T, V) the table's rows at each prefix of `seq`."""
    return table[[INDEX[seq[:t]] for t in range(T)]]


def _on_policy_gradient(theta, teacher, term) -> torch.Tensor:
    """∇θ E_{y ~ q_θ} Σ_t term_t, the history's distribution held fixed: Σ over every prefix h of its probability under
    q_θ times ∇ of the term there — enumerated over prefixes, not over sampled sequences."""
    q = _processed(theta)
    total = theta.new_zeros(())
    for h in PREFIXES:
        prob = math.prod(float(q[INDEX[h[:s]], h[s]].exp()) for s in range(len(h)))
        total = total + prob * term(theta[INDEX[h]], teacher[INDEX[h]], q[INDEX[h]])
    return torch.autograd.grad(total, theta)[0]


def _topk_term(student_row, teacher_row, _q) -> torch.Tensor:
    """The renormalised reverse KL inside the teacher's top-K, written out by hand."""
    ids = teacher_row.topk(K).indices
    s, t = torch.log_softmax(student_row[ids], -1), torch.log_softmax(teacher_row[ids], -1)
    return (s.exp() * (s - t)).sum()


def _union_term(student_row, teacher_row, q) -> torch.Tensor:
    """The renormalised reverse KL inside the teacher's top-K ∪ {the sampled token}, in expectation over the sampled
    token v ~ q_θ: the term depends on v, so its weight must include v's ratio."""
    top = teacher_row.topk(K).indices.tolist()
    total = student_row.new_zeros(())
    for v in range(V):
        if q[v] == -math.inf:
            continue
        ids = torch.tensor(top + ([v] if v not in top else []))
        s, t = torch.log_softmax(student_row[ids], -1), torch.log_softmax(teacher_row[ids], -1)
        total = total + q[v].exp() * (s.exp() * (s - t)).sum()
    return total


def _sampled_term(student_row, teacher_row, q) -> torch.Tensor:
    """Sampled-token OPD's per-position gradient in expectation over the sampled token y ~ q_θ: −A ∇log p_θ(y) with
    A = log p_T(y) − log p_θ(y) (detached), written as a surrogate."""
    logp, logt = torch.log_softmax(student_row, -1), torch.log_softmax(teacher_row, -1)
    advantage = (logt - logp).detach()
    return -(q.exp() * advantage * logp).sum()


# Each case: the loss config the framework runs, and the hand-written on-policy term it estimates.
CASES = {"topk": ({}, _topk_term),
         "union": ({"support": "teacher_topk_union_sampled"}, _union_term),
         "sampled": ({"name": "sampled_token_opd", "old_logprob": "recomputed"}, _sampled_term)}


def _estimator_gradient(theta, behaviour, teacher, case: str, mode: str, cap: float = 1e6) -> torch.Tensor:
    """∇θ of the loss the framework computes on every sequence y, each weighted by its probability under the stale
    q_b (the estimator's exact expectation), with the correction's weights from `off_policy.py` of the kind the
    registry gives the case's config (`mode` "uncorrected": weight 1)."""
    lc = LossConfig(**CASES[case][0], k=K)
    q_theta, q_b = _processed(theta), _processed(behaviour)
    drawn = [y for y in SEQS if bool((_rows(q_b, y).gather(-1, torch.tensor(y)[:, None]) > -math.inf).all())]
    ys = torch.tensor(drawn)  # the sequences the stale weights can draw: the samples' support
    rows = torch.ones(len(drawn), T, dtype=torch.bool)
    current = torch.stack([_rows(q_theta, y).gather(-1, torch.tensor(y)[:, None])[:, 0] for y in drawn])
    behave = torch.stack([_rows(q_b, y).gather(-1, torch.tensor(y)[:, None])[:, 0] for y in drawn])
    seq_prob = behave.sum(-1).exp()  # q_b(y)
    log_ratio = off_policy.log_ratios(current, behave, rows)
    log_w = off_policy.prefix_log_weights(log_ratio)
    if get_loss(lc.name).importance_weight(lc) == "inclusive":
        log_w = log_w + log_ratio
    weights = (torch.ones_like(log_w) if mode == "uncorrected"
               else off_policy.correction_weights(log_w, mode, cap).double())
    weights = weights * seq_prob[:, None]
    student = torch.stack([torch.log_softmax(_rows(theta, y), -1) for y in drawn])  # (Y, T, V)
    teach = torch.stack([torch.log_softmax(_rows(teacher, y), -1) for y in drawn])
    agg = dict(aggregation="seq_mean_token_sum", num_seqs=1.0, weights=weights)
    if lc.name == "sampled_token_opd":
        s = student.gather(-1, ys[..., None])[..., 0]
        value, _ = losses.sampled_token_opd(s, s.detach(), teach.gather(-1, ys[..., None])[..., 0], rows, **agg)
        return torch.autograd.grad(value, theta)[0]
    ids = torch.stack([_rows(teacher, y).topk(K, -1).indices for y in drawn])  # (Y, T, K)
    support_mask = None
    if lc.support == "teacher_topk_union_sampled":
        sampled_teacher = teach.gather(-1, ys[..., None])[..., 0]
        ids, _, support_mask = union_sampled_support(ids, teach.gather(-1, ids), ys, sampled_teacher)
    value, _ = losses.truncated_reverse_kl(student.gather(-1, ids), teach.gather(-1, ids), rows,
                                           support_mask=support_mask, **agg)
    return torch.autograd.grad(value, theta)[0]


def _coverage_holds(theta, behaviour) -> bool:
    """Exactness needs q_b > 0 wherever q_θ > 0 (a token only the current nucleus holds is never drawn)."""
    return bool(((_processed(behaviour) > -math.inf) | (_processed(theta) == -math.inf)).all())


@pytest.mark.parametrize("case", list(CASES))
def test_the_corrected_estimator_is_unbiased_and_the_uncorrected_one_is_not(case):
    theta, behaviour, teacher = _tables()
    assert _coverage_holds(theta, behaviour)
    assert not torch.equal(_processed(theta), _processed(behaviour))  # the toy is really off-policy
    on_policy = _on_policy_gradient(theta, teacher, CASES[case][1])
    corrected = _estimator_gradient(theta, behaviour, teacher, case, "truncate")  # a cap above every weight
    uncorrected = _estimator_gradient(theta, behaviour, teacher, case, "uncorrected")
    scale = on_policy.norm()
    assert (corrected - on_policy).norm() <= 1e-5 * scale  # float32 sampling probabilities: exact to their rounding
    assert (uncorrected - on_policy).norm() >= 0.05 * scale
    # On-policy (b = θ) every weight is 1 and the estimator is the on-policy one.
    assert (_estimator_gradient(theta, theta.detach(), teacher, case, "truncate") - on_policy).norm() <= 1e-5 * scale


def test_truncation_trades_bias_for_bounded_weights():
    theta, behaviour, teacher = _tables()
    on_policy = _on_policy_gradient(theta, teacher, _topk_term)
    errors = {cap: float((_estimator_gradient(theta, behaviour, teacher, "topk", "truncate", cap) - on_policy).norm())
              for cap in (1.05, 2.0, 1e6)}
    assert errors[1e6] <= 1e-5 * float(on_policy.norm())  # a cap above every weight is the exact estimator
    assert errors[1.05] > errors[1e6]


def test_prefix_weights_are_the_exclusive_product_with_the_earlier_turns_offset():
    log_ratio = torch.tensor([[0.5, -0.25, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    got = off_policy.prefix_log_weights(log_ratio, torch.tensor([0.0, -1.0]))
    expected = [[sum(log_ratio[b, :t].tolist()) + off for t in range(4)] for b, off in ((0, 0.0), (1, -1.0))]
    assert got.tolist() == expected


def test_weights_truncate_at_the_cap_or_drop_outside_the_band():
    log_w = torch.log(torch.tensor([0.1, 0.5, 1.0, 1.9, 2.1, 50.0], dtype=torch.float64))
    assert off_policy.correction_weights(log_w, "truncate", 2.0).tolist() == pytest.approx([0.1, 0.5, 1, 1.9, 2, 2])
    assert off_policy.correction_weights(log_w, "drop", 2.0).tolist() == [0, 1, 1, 1, 0, 0]
    assert off_policy.correction_weights(log_w, "none", 2.0).tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="must be > 1"):
        off_policy.correction_weights(log_w, "truncate", 1.0)


def test_a_token_outside_the_current_nucleus_zeroes_every_later_weight():
    current = torch.tensor([[-0.1, -math.inf, -0.2, -0.3]])
    behaviour = torch.tensor([[-0.1, -0.5, -0.2, -0.3]])
    rows = torch.ones(1, 4, dtype=torch.bool)
    log_ratio = off_policy.log_ratios(current, behaviour, rows)
    weights = off_policy.correction_weights(off_policy.prefix_log_weights(log_ratio), "truncate", 2.0)
    assert weights.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    metrics = off_policy.weight_metrics(off_policy.weight_sums(off_policy.prefix_log_weights(log_ratio), weights,
                                                               log_ratio, rows, "truncate", 2.0))
    assert metrics["offpolicy/outside_nucleus_fraction"] == 0.25
    assert metrics["offpolicy/zeroed_fraction"] == 0.5  # the token's own row keeps its (prefix) weight
    assert metrics["offpolicy/weight_mean"] == 0.5 and metrics["offpolicy/outside_cap_fraction"] == 0.0


def test_the_registry_gives_each_config_the_weight_its_term_needs():
    kind = {name: get_loss(lc.name).importance_weight(lc) for name, lc in {
        "topk": LossConfig(), "student_topk": LossConfig(support="student_topk"),
        "union": LossConfig(support="teacher_topk_union_sampled"),
        "sampled": LossConfig(name="sampled_token_opd"),
        "sampled_rollout": LossConfig(name="sampled_token_opd", old_logprob="rollout")}.items()}
    assert kind == {"topk": "prefix", "student_topk": "prefix", "union": "inclusive", "sampled": "inclusive",
                    "sampled_rollout": "prefix"}


def test_fully_masked_rows_give_zero_loss_and_finite_gradients_with_weights():
    student = torch.randn(2, 3, K, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 3, K, dtype=torch.float64), -1)
    weights = torch.full((2, 3), float("nan"))  # garbage at masked rows is ignored
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, _ = losses.truncated_reverse_kl(torch.log_softmax(student, -1), teacher, mask, weights=weights)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(student.grad).all()


# ---- in the learner -----------------------------------------------------------------------------------------------

@torch.no_grad()
def _processed_behaviour(model, samples, params: SamplingParams) -> list[torch.Tensor]:
    """Each sample's tokens' log-probs under the model's processed sampling distribution, one plain forward each."""
    out = []
    for s in samples:
        logits = model(torch.tensor([s.input_ids])).logits[0].float()
        pos = torch.tensor(s.loss_positions())
        out.append(processed_logprobs(logits[pos - 1], params).gather(-1, torch.tensor(s.input_ids)[pos, None])[:, 0])
    return out


@torch.no_grad()
def _drawn(model, samples, params: SamplingParams, new_tokens: int = 6) -> list[Sample]:
    """The samples' prompts with responses drawn from `model` by the rollout's sampler, behaviour log-probs included."""
    out, generator = [], torch.Generator().manual_seed(0)
    for s in samples:
        prompt = s.input_ids[:s.loss_positions()[0]]
        ids, behaviour = list(prompt), [0.0] * len(prompt)
        for _ in range(new_tokens):
            token, logprob = sample_step(model(torch.tensor([ids])).logits[0, -1:].float(), params, generator)
            ids.append(int(token))
            behaviour.append(float(logprob))
        out.append(dataclasses.replace(s, input_ids=ids, loss_mask=[0] * len(prompt) + [1] * new_tokens,
                                       behaviour_logprobs=behaviour))
    return out


def _with_behaviour(samples: list[Sample], logprobs: list[torch.Tensor]) -> list[Sample]:
    out = []
    for s, lp in zip(samples, logprobs):
        behaviour = [0.0] * len(s.input_ids)
        for p, v in zip(s.loss_positions(), lp.tolist()):
            behaviour[p] = v
        out.append(dataclasses.replace(s, behaviour_logprobs=behaviour))
    return out


def test_in_the_learner_fresh_samples_weigh_one_and_stale_ones_their_ratio(tiny_model_dirs, tiny_tokenizer):
    path = tiny_model_dirs["student"]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"])
    params = SamplingParams(temperature=1.0, top_p=0.9)  # the config's rollout defaults
    student = AutoModelForCausalLM.from_pretrained(path)
    fresh = _drawn(student, _samples(tiny_tokenizer, 4), params)
    outs = _teacher(teacher, fresh, 8)

    plain = Learner(_cfg(path), str(path)).update(fresh, outs)
    corrected_learner = Learner(_cfg(path, **{"loss.off_policy_correction": "truncate"}), str(path))
    corrected = corrected_learner.update(fresh, outs)
    assert corrected["offpolicy/raw_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert corrected["offpolicy/outside_nucleus_fraction"] == 0.0
    assert corrected["loss"] == pytest.approx(plain["loss"], rel=1e-5)

    # Stale: behaviour from other weights (the teacher's logits would not fit; perturb the student instead).
    stale_model = copy.deepcopy(student)
    with torch.no_grad():
        stale_model.lm_head.weight.add_(0.3 * torch.randn_like(stale_model.lm_head.weight))
    stale = _drawn(stale_model, fresh, params)
    outs = _teacher(teacher, stale, 8)
    learner = Learner(_cfg(path, **{"loss.off_policy_correction": "truncate", "loss.importance_cap": 1e6}), str(path))
    weights, metrics = learner._importance([list(range(len(stale)))], stale, outs)
    current = _processed_behaviour(student, stale, params)
    for i, s in enumerate(stale):
        behave = torch.tensor([s.behaviour_logprobs[p] for p in s.loss_positions()])
        ratio = (current[i].double() - behave.double()).clamp(min=-1e4)
        expected = torch.cat([ratio.new_zeros(1), ratio.cumsum(0)[:-1]]).exp().float()
        torch.testing.assert_close(weights[i], expected, rtol=1e-4, atol=1e-6)
    assert metrics["offpolicy/ess_fraction"] < 1.0


def test_a_per_turn_sample_carries_its_episodes_earlier_turns(tiny_model_dirs, tiny_tokenizer):
    path = tiny_model_dirs["student"]
    samples = _samples(tiny_tokenizer, 2)
    for turn, s in enumerate(samples):
        s.episode_id, s.metadata = "e", {"turn": turn}
    learner = Learner(_cfg(path, **{"loss.off_policy_correction": "truncate"}), str(path))
    log_ratio = {0: torch.tensor([0.5, -0.25], dtype=torch.float64), 1: torch.tensor([1.0], dtype=torch.float64)}
    offsets = learner._episode_offsets(samples, log_ratio)
    assert offsets[0].item() == 0.0 and offsets[1].item() == 0.25
