"""The loss author's contract (`LossInputs`): every registered loss gives the values it gave before the explicit
fields (golden file written by the previous contract), each adapter is exactly its pure tensor function, and a loss
that reads the side of the student it was not given gets an error naming the registration that gives it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opd_agents.learner import losses
from opd_agents.learner.loss_inputs import LossInputs, LossInputsError
from opd_agents.learner.registry import registered_losses
from tests.learner.loss_cases import CONFIGS, cases, evaluate, rows_of

GOLDEN = json.loads((Path(__file__).parent / "loss_golden.json").read_text())
CASES = {name: (lc, mb, student, support) for name, lc, mb, student, support in cases()}


def test_the_cases_cover_every_built_in_loss_on_both_paths():
    built_in = {"topk_reverse_kl", "full_reverse_kl", "sampled_token_opd"}
    assert built_in <= set(registered_losses())
    assert {lc.name for lc, *_ in CASES.values()} == built_in
    assert {support for *_, support in CASES.values()} == {True, False}
    assert set(GOLDEN["cases"]) == {name for name, _ in CONFIGS}


@pytest.mark.parametrize("name", [name for name, _ in CONFIGS])
def test_every_registered_loss_gives_its_golden_values(name):
    lc, mb, student, support = CASES[name]
    golden = GOLDEN["cases"][name]
    assert golden["support_path"] == support
    got = evaluate(lc, mb, student, support, LossInputs.from_rows)
    want = {"loss": float.fromhex(golden["loss"]), "metrics": {k: float.fromhex(v) for k, v in
                                                               golden["metrics"].items()},
            "grad": [float.fromhex(v) for v in golden["grad"]]}
    assert sorted(got["metrics"]) == sorted(want["metrics"])
    if torch.backends.cpu.get_cpu_capability() == GOLDEN["cpu_capability"]:
        # Same torch build and SIMD kernels as the golden's machine: bit for bit.
        assert got == want
    else:  # other kernels may round the last bits of a reduction differently
        flat = lambda r: [r["loss"], *(r["metrics"][k] for k in sorted(r["metrics"])), *r["grad"]]  # noqa: E731
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(flat(got), flat(want)))


def _direct(name: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The pure tensor function each adapter stands for, called on the raw tensors (no LossInputs)."""
    lc, mb, student, support = CASES[name]
    rows = rows_of(mb, student, support)
    mask = mb.loss_mask
    agg = {"aggregation": lc.aggregation} | ({"num_tokens": float(mask.sum())} if lc.aggregation == "token_mean"
                                            else {"num_seqs": float(mask.shape[0])})
    diag = dict(support_ids=mb.support_ids, sampled_ids=mb.sampled_ids, turns=mb.turns, entropy=rows.entropy,
                student_mask=rows.vocab_mask)
    if lc.name == "sampled_token_opd":
        old = mb.behaviour if lc.old_logprob == "rollout" else mb.old_logprobs
        return losses.sampled_token_opd(rows.sampled_logprob, old, mb.teacher_sampled, mask, clip_eps=lc.clip_eps,
                                        clip_eps_high=lc.clip_eps_high, clip_ratio_c=lc.clip_ratio_c,
                                        adv_clip=lc.adv_clip, support_mask=mb.support_mask, **agg, **diag)
    return losses.truncated_reverse_kl(
        rows.support, mb.teacher_logprobs, mask, support_mask=mb.support_mask,
        renormalize=lc.renormalize or lc.name == "full_reverse_kl", log_ratio_clip=lc.log_ratio_clip,
        student_is_logits=support, student_vocab_logprobs=rows.vocab_logprobs, student_logprob=rows.sampled_logprob,
        teacher_logprob=mb.teacher_sampled, **agg, **diag)


@pytest.mark.parametrize("name", [name for name, _ in CONFIGS])
def test_each_adapter_is_exactly_its_pure_function(name):
    lc, mb, student, support = CASES[name]
    loss, metrics = _direct(name)
    (grad,) = torch.autograd.grad(loss, student)
    got = evaluate(lc, mb, student, support, LossInputs.from_rows)
    assert got == {"loss": float(loss.detach()), "metrics": {k: float(v) for k, v in sorted(metrics.items())},
                   "grad": [float(v) for v in grad.flatten()]}


def test_each_field_means_one_thing_and_the_other_side_is_an_error():
    _, mb, student, _ = CASES["topk_renorm_support"]
    on_logits = LossInputs.from_rows(mb, rows_of(mb, student, True), mb.loss_mask, 1.0, 1.0)
    on_logprobs = LossInputs.from_rows(mb, rows_of(mb, student, False), mb.loss_mask, 1.0, 1.0)
    assert on_logits.on_support_path and not on_logprobs.on_support_path
    torch.testing.assert_close(on_logits.student_logits_BLK, student.gather(-1, mb.support_ids), rtol=0, atol=0)
    logp = torch.log_softmax(student, -1)
    torch.testing.assert_close(on_logprobs.student_logprobs_BLK, logp.gather(-1, mb.support_ids), rtol=0, atol=0)
    with pytest.raises(LossInputsError, match="full_student_logits=True to get student_logprobs_BLK"):
        _ = on_logits.student_logprobs_BLK
    with pytest.raises(LossInputsError, match="full_student_logits=False"):
        _ = on_logprobs.student_logits_BLK
    with pytest.raises(LossInputsError, match="full-vocabulary path"):
        _ = on_logits.student_sampled_logprobs_BL
    assert on_logprobs.student_sampled_logprobs_BL.requires_grad
    for x in (on_logits, on_logprobs):  # diagnostics never carry gradient
        assert not any(t.requires_grad for t in (x.diag_vocab_logprobs_BLK, x.diag_sampled_logprobs_BL,
                                                 x.diag_entropy_BL))
    assert on_logprobs.diag_mask_BL is None and int(on_logits.diag_mask_BL.sum()) == 3
    assert on_logits.support_ids_BLK.shape == on_logits.teacher_logprobs_BLK.shape == (2, 5, 4)
    assert on_logits.mask_BL.shape == on_logits.rollout_logprobs_BL.shape == (2, 5)
