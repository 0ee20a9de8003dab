"""TeacherRouter: per-task routing, shared teachers loaded once, start-up vocab check, dotted-path backends."""
from __future__ import annotations

import pytest
import torch

from opd_agents.config import Config
from teachers.hf import HFTeacher
from teachers.registry import register_teacher, resolve_teacher_class
from teachers.router import TeacherRouter
from teachers.vocab import VocabMismatchError


class CountingTeacher(HFTeacher):
    """A user backend defined outside the framework (named by dotted path); counts how often it is built."""

    built: list[str] = []

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        CountingTeacher.built.append(name)


@register_teacher("test-counting")
class RegisteredCountingTeacher(CountingTeacher):
    """The same, registered by decorator under a backend name."""


def make_config(dirs, backend: str, vocab_mismatch: str = "error") -> Config:
    return Config(
        student={"path": str(dirs["student"])},
        teachers={
            "shared": {"backend": backend, "model": str(dirs["teacher"]), "vocab_mismatch": vocab_mismatch},
            "other": {"backend": backend, "model": str(dirs["student"]), "vocab_mismatch": vocab_mismatch},
            "unused": {"backend": backend, "model": "/nonexistent/never/loaded"},
        },
        tasks=[{"name": "math", "env_id": "opd/Math-v0", "teacher": "shared"},
               {"name": "alfworld", "env_id": "opd/ALFWorld-v0", "teacher": "shared"},
               {"name": "game", "env_id": "opd/Game-v0", "teacher": "other"}],
    )


@pytest.fixture(scope="module")
def sample(tiny_tokenizer, make_chat_sample):
    return make_chat_sample(tiny_tokenizer, [{"role": "user", "content": "What is 12 + 35?"},
                                             {"role": "assistant", "content": "The answer is \\boxed{47}."}])


def test_dotted_path_resolution():
    assert resolve_teacher_class(f"{__name__}:CountingTeacher") is CountingTeacher
    assert resolve_teacher_class(f"{__name__}.CountingTeacher") is CountingTeacher
    assert resolve_teacher_class("test-counting") is RegisteredCountingTeacher
    with pytest.raises(TypeError, match="not a subclass"):
        resolve_teacher_class(f"{__name__}:make_config")


@pytest.mark.parametrize("backend", [f"{__name__}:CountingTeacher", "test-counting"])
def test_router_routes_per_task_and_builds_shared_teacher_once(tiny_model_dirs, tiny_tokenizer, sample, backend):
    CountingTeacher.built.clear()
    router = TeacherRouter.from_config(make_config(tiny_model_dirs, backend), student_vocab=tiny_tokenizer.get_vocab())
    try:
        assert sorted(CountingTeacher.built) == ["other", "shared"]
        assert router["math"] is router["alfworld"] and router["math"] is not router["game"]
        assert router.tasks == ["math", "alfworld", "game"]
        got = router.topk("math", [sample], 4)[0]
        direct = HFTeacher("direct", router["math"].cfg).topk([sample], 4)[0]
        assert torch.equal(got.topk_ids, direct.topk_ids)
        assert not torch.equal(router.topk("game", [sample], 4)[0].topk_logprobs, got.topk_logprobs)
        with pytest.raises(KeyError, match="'math', 'alfworld', 'game'"):
            router.topk("chess", [sample], 4)
    finally:
        router.close()


def test_vocab_mismatch_is_detected_at_start_up(tiny_model_dirs, tiny_tokenizer):
    vocab = dict(tiny_tokenizer.get_vocab())
    vocab["<|im_end|>"], vocab["<|im_start|>"] = vocab["<|im_start|>"], vocab["<|im_end|>"]
    with pytest.raises(VocabMismatchError, match="<|im_end|>"):
        TeacherRouter.from_config(make_config(tiny_model_dirs, "hf"), student_vocab=vocab)


def test_map_mode_answers_in_student_id_space(tiny_model_dirs, tiny_tokenizer, sample):
    vocab = dict(tiny_tokenizer.get_vocab())
    a, b = vocab["<|im_end|>"], vocab["<|im_start|>"]
    vocab["<|im_end|>"], vocab["<|im_start|>"] = b, a
    swap = {a: b, b: a}
    student_sample = type(sample)(**{**sample.__dict__, "input_ids": [swap.get(i, i) for i in sample.input_ids]})
    router = TeacherRouter.from_config(make_config(tiny_model_dirs, "hf", "map"), student_vocab=vocab)
    try:
        assert router.vocab_report("math").policy == "map" and not router.vocab_report("math").identical
        got = router.topk("math", [student_sample], 8)[0]
        direct = router["math"].topk([sample], 8)[0]  # the same text in teacher ids
        assert got.topk_ids.tolist() == [[swap.get(i, i) for i in row] for row in direct.topk_ids.tolist()]
        torch.testing.assert_close(got.topk_logprobs, direct.topk_logprobs)
        torch.testing.assert_close(got.sampled_logprobs, direct.sampled_logprobs)
    finally:
        router.close()
