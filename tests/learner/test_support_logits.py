"""The support-only student path equals the full-vocabulary path: logits, loss, gradients (head, hidden states,
a tiny model's parameters through `StudentScorer`), one learner step, and the config switch that picks it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from opd_agents.config import ConfigError, build_config
from opd_agents.learner.learner import Learner
from opd_agents.learner.losses import sampled_token_diagnostics, truncated_reverse_kl
from opd_agents.learner.registry import get_loss
from opd_agents.learner.student import StudentScorer
from opd_agents.learner.support_logits import diagnostic_rows, support_logits
from opd_agents.learner.supports import gather_student_logprobs
from opd_agents.run.preflight import loss_spec
from opd_agents.samples import TeacherTopK
from tests.learner.test_learner import _cfg, _samples, _sharp_teacher, _teacher

D = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _head(T: int, H: int, V: int, K: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 hidden (T, H), head weight (V, H) and bias (V,) with gradients; K distinct ids per row (T, K)."""
    g = _gen(seed)
    return {"hidden": torch.randn(T, H, generator=g, dtype=D, requires_grad=True),
            "weight": torch.randn(V, H, generator=g, dtype=D, requires_grad=True),
            "bias": torch.randn(V, generator=g, dtype=D, requires_grad=True),
            "ids": torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(T)])}


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_support_logits_equal_gathered_full_logits_with_gradients(chunk):
    x = _head(T=7, H=5, V=11, K=4)
    params = (x["hidden"], x["weight"], x["bias"])
    got = support_logits(x["hidden"], x["weight"], x["ids"], bias=x["bias"], chunk=chunk)
    want = (x["hidden"] @ x["weight"].T + x["bias"]).gather(-1, x["ids"])
    upstream = torch.randn(want.shape, generator=_gen(1), dtype=D)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), params),
                    torch.autograd.grad((want * upstream).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_support_logits_gradcheck_and_frozen_head():
    x = _head(T=5, H=3, V=6, K=3, seed=2)
    x["ids"][1, 0] = x["ids"][0, 0]  # an id shared by two rows: its weight row collects both gradients
    assert torch.autograd.gradcheck(lambda h, w, b: support_logits(h, w, x["ids"], bias=b, chunk=2),
                                    (x["hidden"], x["weight"], x["bias"]))
    frozen = x["weight"].detach()
    (grad,) = torch.autograd.grad(support_logits(x["hidden"], frozen, x["ids"], chunk=2).sum(), (x["hidden"],))
    torch.testing.assert_close(grad, frozen[x["ids"]].sum(1))


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_support_logits_never_hold_a_block_of_gathered_rows():
    T, H, V, K, chunk = 64, 8, 50, 16, 16  # T·K·H = 8,192; one chunk's (chunk, K, H) = 2,048
    hidden = torch.randn(T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(V, (T, K))
    with _LargestOutput() as mode:
        support_logits(hidden, weight, ids, chunk=chunk).sum().backward()
    # Nothing larger than the inputs, outputs and gradients themselves (weight rows are gathered one slot at a time).
    assert mode.largest == max(V * H, T * H, T * K) < chunk * K * H


def _both_paths(x: dict[str, torch.Tensor], teacher: torch.Tensor, mask: torch.Tensor, **kw):
    """(loss, metrics) of the full path and of the support path on the same head, rows viewed as teacher's (..., K).
    The support path gets its full-vocabulary diagnostics from a no-grad full pass over every row."""
    shape = teacher.shape
    s = gather_student_logprobs(x["hidden"], x["weight"], x["ids"], bias=x["bias"], chunk=3)
    full = truncated_reverse_kl(s.logprobs.view(shape), teacher, mask, entropy=s.entropy.view(shape[:-1]), **kw)
    logits = support_logits(x["hidden"], x["weight"], x["ids"], bias=x["bias"], chunk=3)
    fast = truncated_reverse_kl(logits.view(shape), teacher, mask, student_is_logits=True,
                                student_vocab_logprobs=s.logprobs.detach().view(shape),
                                entropy=s.entropy.detach().view(shape[:-1]), **kw)
    return full, fast


@pytest.mark.parametrize("case", ["plain", "support_mask", "clip", "teacher_-inf", "seq_mean"])
def test_support_path_loss_and_gradients_equal_the_full_path(case):
    T, K = 9, 4
    x = _head(T=T, H=6, V=13, K=K, seed=3)
    g = _gen(4)
    teacher = torch.log_softmax(torch.randn(T, K, generator=g, dtype=D) * 2, -1) - 0.3
    mask = torch.rand(T, generator=g) > 0.3
    mask[0] = True
    kw: dict = {}
    if case == "support_mask":  # padding / vocab-mismatch slots, one row with a single valid slot
        kw["support_mask"] = torch.rand(T, K, generator=g) > 0.3
        kw["support_mask"][0] = torch.tensor([True, False, False, False])
    elif case == "clip":
        kw["log_ratio_clip"] = 0.5
    elif case == "teacher_-inf":
        teacher[0, 1] = float("-inf")
    elif case == "seq_mean":  # (B, L, K) = (3, 3, K)
        mask, teacher = mask.view(3, 3), teacher.view(3, 3, K)
        kw["aggregation"] = "seq_mean_token_mean"
    (full, full_metrics), (fast, fast_metrics) = _both_paths(x, teacher, mask, **kw)
    assert torch.isfinite(full) and fast.item() == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    params = (x["hidden"], x["weight"], x["bias"])
    for a, b in zip(torch.autograd.grad(full, params), torch.autograd.grad(fast, params)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert fast_metrics == pytest.approx(full_metrics, rel=1e-10, abs=1e-12)


def test_support_path_gradcheck_and_fully_masked_rows():
    g = _gen(5)
    logits = torch.randn(3, 4, generator=g, dtype=D, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(3, 4, generator=g, dtype=D), -1)
    mask = torch.tensor([True, False, True])
    support = torch.tensor([[True, True, False, True]] * 3)
    assert torch.autograd.gradcheck(
        lambda z: truncated_reverse_kl(z, teacher, mask, support_mask=support, student_is_logits=True)[0], (logits,))
    garbage = logits.detach().clone()
    garbage[1] = float("nan")  # a masked row may hold anything
    garbage[0, 2] = float("inf")  # so may a padding slot
    garbage.requires_grad_()
    loss, metrics = truncated_reverse_kl(garbage, teacher, mask, support_mask=support, student_is_logits=True)
    (grad,) = torch.autograd.grad(loss, garbage)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[1] == 0).all() and grad[0, 2] == 0
    nothing, _ = truncated_reverse_kl(garbage, teacher, torch.zeros(3, dtype=torch.bool), student_is_logits=True)
    (grad,) = torch.autograd.grad(nothing, garbage)
    assert nothing.item() == 0 and (grad == 0).all()
    with pytest.raises(ValueError, match="renormalize"):
        truncated_reverse_kl(logits, teacher, mask, renormalize=False, student_is_logits=True)


def test_student_mask_restricts_student_diagnostics_but_not_the_bucket_index():
    L = 100
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[0, :10] = False  # prompt tokens: position 80 is the 70th masked token
    gap = torch.arange(L, dtype=D)[None]
    only = torch.zeros_like(mask)
    only[0, 80] = True
    m = sampled_token_diagnostics(mask, entropy=gap, student_logprob=-gap, teacher_logprob=torch.zeros_like(gap),
                                  student_mask=only)
    assert m["entropy"] == 80 and m["gap_mean"] == 80 and m["gap_mean@64-255"] == 80 and "gap_mean@0-63" not in m
    whole = sampled_token_diagnostics(mask, entropy=gap, student_logprob=-gap, teacher_logprob=torch.zeros_like(gap))
    assert whole == sampled_token_diagnostics(mask, entropy=gap, student_logprob=-gap,
                                              teacher_logprob=torch.zeros_like(gap), student_mask=mask)


def test_diagnostic_rows_are_a_seeded_random_subsample_of_the_mask():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2:] = mask[2, 5:] = True  # 13 set positions, row 1 empty
    every = mask.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(diagnostic_rows(mask, None), every) and torch.equal(diagnostic_rows(mask, 50), every)
    assert diagnostic_rows(mask, 0).numel() == 0
    four = diagnostic_rows(mask, 4, seed=3)
    assert four.numel() == 4 and set(four.tolist()) <= set(every.tolist()) and bool((four.diff() > 0).all())
    assert torch.equal(four, diagnostic_rows(mask, 4, seed=3))  # reproducible from its seed
    assert len({tuple(diagnostic_rows(mask, 4, seed=s).tolist()) for s in range(20)}) > 1


def _tiny_model(tied: bool, bias: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(config).to(D)
    if bias:
        model.lm_head = torch.nn.Linear(16, 40, bias=True, dtype=D)
    return model.train()


@pytest.mark.parametrize(("tied", "bias"), [(True, False), (False, True)])
def test_scorer_support_path_gives_the_full_paths_loss_and_parameter_gradients(tied, bias):
    model = _tiny_model(tied, bias)
    g = _gen(6)
    B, T, L, K = 2, 12, 8, 5
    input_ids = torch.randint(40, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, -3:] = 0
    positions = torch.arange(4, 12).expand(B, L).clone()
    positions[1, -3:] = 1  # padding rows
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -3:] = False
    ids = torch.stack([torch.randperm(40, generator=g)[:K] for _ in range(B * L)]).view(B, L, K)
    sampled = input_ids.gather(1, positions)
    teacher = torch.log_softmax(torch.randn(B, L, K, generator=g, dtype=D), -1)
    scorer = StudentScorer(model, chunk=3)
    grads = []
    for rows in (None, diagnostic_rows(mask, None)):
        support, vocab, entropy, sampled_lp = scorer(input_ids, attention, positions, ids, sampled, rows)
        student_mask = None if rows is None else mask
        loss, metrics = truncated_reverse_kl(support, teacher, mask, student_is_logits=rows is not None,
                                             student_vocab_logprobs=vocab, entropy=entropy, student_mask=student_mask,
                                             student_logprob=sampled_lp, teacher_logprob=teacher[..., 0])
        grads.append((loss.item(), metrics, torch.autograd.grad(loss, list(model.parameters()))))
    (full_loss, full_metrics, full_grads), (fast_loss, fast_metrics, fast_grads) = grads
    assert fast_loss == pytest.approx(full_loss, rel=1e-12)
    assert fast_metrics == pytest.approx(full_metrics, rel=1e-10, abs=1e-12)
    for a, b in zip(full_grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def _learner(model_dir, path: str, **over) -> Learner:
    learner = Learner(_cfg(model_dir, **{"loss.k": 8, "loss.student_logits": path, **over}), str(model_dir))
    learner.model.double()  # float64: Adam's first step divides by |g|, so compare at float64 precision
    return learner


@pytest.mark.parametrize("support", ["teacher_topk", "teacher_topk_union_sampled", "student_topk", "entropy_top"])
def test_learner_step_is_the_same_on_both_paths(tiny_model_dirs, tiny_tokenizer, support):
    samples = _samples(tiny_tokenizer, 3)
    teacher_model = _sharp_teacher(tiny_model_dirs["teacher"])
    over = {"loss.support": support, "loss.diagnostic_positions": "null", "optim.micro_batch_tokens": 40}
    if support == "entropy_top":
        over = {**over, "loss.support": "teacher_topk", "loss.entropy_top_ratio": 0.5}
    learners = {path: _learner(tiny_model_dirs["student"], path, **over) for path in ("full", "support")}
    if support == "student_topk":
        ids = learners["full"].student_topk_ids(samples, 8)
        outs = []
        for s, top in zip(samples, ids):
            with torch.no_grad():
                logp = torch.log_softmax(teacher_model(torch.tensor([s.input_ids])).logits[0].float(), -1)
            pos = torch.tensor(s.loss_positions())
            rows = logp[pos - 1]
            sampled = rows.gather(-1, torch.tensor(s.input_ids)[pos, None])[:, 0]
            outs.append(TeacherTopK(top, rows.gather(-1, top), sampled))
    else:
        outs = _teacher(teacher_model, samples, 8)
    outs[0].topk_ids[0, :3] = -1  # teacher ids without a student counterpart (vocab mismatch): dropped slots
    # A student token the teacher lacks: the teacher's answer marks its rows unscored and they leave the loss.
    dropped = samples[1].input_ids[-1]
    outs[1].scored = torch.tensor([samples[1].input_ids[t] != dropped for t in samples[1].loss_positions()])
    before = copy.deepcopy(learners["full"].model.state_dict())
    metrics = {path: learner.update(copy.deepcopy(samples), copy.deepcopy(outs)) for path, learner in learners.items()}
    assert metrics["support"] == pytest.approx(metrics["full"], rel=1e-9, abs=1e-12)
    full, fast = learners["full"].model.state_dict(), learners["support"].model.state_dict()
    assert not torch.equal(full["lm_head.weight"], before["lm_head.weight"])  # the step did move the weights
    for key, value in full.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-10, atol=1e-12)


def test_learner_diagnostics_are_subsample_estimates(tiny_model_dirs, tiny_tokenizer):
    samples = _samples(tiny_tokenizer, 2)
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 8)
    learner = _learner(tiny_model_dirs["student"], "auto")
    learner.optimizer.step = lambda: None
    mb = learner._collate(samples, outs)
    exact = learner._loss(mb, mb.loss_mask, float(mb.loss_mask.sum()), 2.0)[1]
    learner.cfg.loss.diagnostic_positions = 2
    rows = learner._student_rows(mb, mb.support_ids, mb.loss_mask)
    assert int(rows.vocab_mask.sum()) == 2
    picked = rows.vocab_mask.reshape(-1).nonzero().squeeze(1)
    estimate = learner._loss(mb, mb.loss_mask, float(mb.loss_mask.sum()), 2.0)[1]
    assert estimate["entropy"] == pytest.approx(float(rows.entropy.reshape(-1)[picked].mean()))
    assert estimate["kl_mean"] == exact["kl_mean"] and estimate["entropy"] != exact["entropy"]
    learner.cfg.loss.diagnostic_positions = 0
    off = learner._loss(mb, mb.loss_mask, float(mb.loss_mask.sum()), 2.0)[1]
    assert not {"entropy", "gap_mean", "student_support_mass"} & set(off) and off["kl_mean"] == exact["kl_mean"]


def test_student_logits_config_switch(tiny_model_dirs):
    def loss_cfg(**over):
        return _cfg(tiny_model_dirs["student"], **over).loss

    def support_path(lc):
        return get_loss(lc.name).uses_support_logits(lc)

    assert support_path(loss_cfg()) and support_path(loss_cfg(**{"loss.support": "student_topk"}))
    for over in ({"loss.renormalize": False}, {"loss.name": "sampled_token_opd"}, {"loss.name": "full_reverse_kl"},
                 {"loss.student_logits": "full"}):
        assert not support_path(loss_cfg(**over))
    with pytest.raises(ConfigError, match="student_logits = 'support'.*needs the full-vocabulary normaliser.*'full'"):
        loss_spec(_cfg(tiny_model_dirs["student"], **{"loss.student_logits": "support", "loss.renormalize": False}))
    with pytest.raises(ConfigError, match="loss.student_logits.*'auto', 'support' or 'full'"):
        loss_cfg(**{"loss.student_logits": "fast"})
    with pytest.raises(ConfigError, match="loss.diagnostic_positions"):
        loss_cfg(**{"loss.diagnostic_positions": -1})
    assert build_config(_cfg(tiny_model_dirs["student"]).model_dump(), ["loss.diagnostic_positions=null"]
                        ).loss.diagnostic_positions is None
