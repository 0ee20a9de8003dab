"""The student top-K support (the paper's Table 4): the learner picks the student's top-K ids, the teacher scores
exactly those ids, and an update on them runs and moves the student toward the teacher inside that support."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.config import ConfigError, TeacherConfig, build_config
from opd_agents.learner.learner import Learner
from opd_agents.run.preflight import preflight
from teachers.hf import HFTeacher

MESSAGES = [
    [{"role": "user", "content": "What is 12 + 35?"}, {"role": "assistant", "content": "\\boxed{47}"}],
    [{"role": "user", "content": "go to countertop 1"}, {"role": "assistant",
                                                         "content": "<action>take apple 1</action>"}],
]


def _full_logprobs(model, sample):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([sample.input_ids])).logits[0].float(), -1)
    return logp[torch.tensor(sample.loss_positions()) - 1]


def test_student_topk_ids_are_scored_by_the_teacher(tiny_model_dirs, tiny_tokenizer, make_chat_sample):
    samples = [make_chat_sample(tiny_tokenizer, m, task="math") for m in MESSAGES]
    cfg = build_config({
        "run": {"device": "cpu"}, "student": {"path": str(tiny_model_dirs["student"])},
        "teachers": {"t": {"model": str(tiny_model_dirs["teacher"])}},
        "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t"}],
        "loss": {"k": 6, "support": "student_topk"}, "optim": {"lr": 1e-2},
    })
    learner = Learner(cfg, str(tiny_model_dirs["student"]))
    teacher = HFTeacher("t", TeacherConfig(model=str(tiny_model_dirs["teacher"]), chunk_size=2))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]).eval()

    ids = learner.student_topk_ids(samples, 6)
    for s, got in zip(samples, ids):
        expected = _full_logprobs(learner.model, s).topk(6, -1).indices
        assert torch.equal(got, expected)
    scored = teacher.score(samples, ids)
    for s, got, out in zip(samples, ids, scored):
        full = _full_logprobs(reference, s)
        assert torch.equal(out.topk_ids, got)
        torch.testing.assert_close(out.topk_logprobs, full.gather(-1, got), rtol=1e-5, atol=1e-5)
        sampled = torch.tensor(s.input_ids)[torch.tensor(s.loss_positions())]
        torch.testing.assert_close(out.sampled_logprobs, full.gather(-1, sampled[:, None])[:, 0], rtol=1e-5, atol=1e-5)

    first = learner.update(samples, scored)
    for _ in range(10):
        last = learner.update(samples, teacher.score(samples, learner.student_topk_ids(samples, 6)))
    assert math.isfinite(last["loss"]) and last["loss"] < first["loss"]


def test_student_topk_with_a_backend_that_cannot_score_fails_at_start(tiny_model_dirs):
    cfg = build_config({
        "student": {"path": str(tiny_model_dirs["student"])},
        "teachers": {"t": {"backend": "vllm", "model": str(tiny_model_dirs["teacher"])}},
        "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t"}],
        "loss": {"k": 6, "support": "student_topk"},
    })
    with pytest.raises(ConfigError, match="VLLMTeacher, which cannot"):
        preflight(cfg)


@pytest.mark.parametrize("over, why", [({"fidelity": {"every": 5}}, "signal-fidelity probe"),
                                       ({"loss": {"name": "full_reverse_kl"}}, "loss 'full_reverse_kl'")])
def test_a_full_distribution_query_with_a_backend_that_cannot_answer_it_fails_at_start(tiny_model_dirs, over, why):
    # vLLM's prompt log-probs stop at max_logprobs: a probe at step 1 would otherwise fail mid-run.
    data = {"student": {"path": str(tiny_model_dirs["student"])},
            "teachers": {"t": {"backend": "vllm", "model": str(tiny_model_dirs["teacher"])}},
            "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t"}]} | over
    with pytest.raises(ConfigError, match=f"{why}.*VLLMTeacher, which cannot serve it"):
        preflight(build_config(data))
    data["teachers"]["t"]["backend"] = "hf"
    preflight(build_config(data))
