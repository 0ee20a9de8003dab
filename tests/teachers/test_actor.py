"""Teachers as Ray actors: same answers as in-process, retries after the actor dies, bounded clear failures."""
from __future__ import annotations

import time

import pytest
import ray
import torch

from opd_agents.config import Config, TeacherConfig
from teachers.actor import RemoteTeacher, TeacherError
from teachers.hf import HFTeacher
from teachers.router import TeacherRouter


@pytest.fixture(scope="module")
def cfg(tiny_model_dirs) -> TeacherConfig:
    # Fractional CPUs so several actors fit the one-CPU test cluster.
    return TeacherConfig(model=str(tiny_model_dirs["teacher"]), ray_actor=True, num_cpus=0.25, call_timeout_s=60,
                         start_timeout_s=120, options={"ray_max_attempts": 2, "ray_backoff_s": 0.05})


@pytest.fixture(scope="module")
def samples(tiny_tokenizer, make_chat_sample):
    return [make_chat_sample(tiny_tokenizer, [{"role": "user", "content": "What is 12 + 35?"},
                                              {"role": "assistant", "content": c}], task="math")
            for c in ("12 + 35 = 47.", "The answer is \\boxed{47}.")]


@pytest.fixture(scope="module")
def router(ray_cluster, tiny_model_dirs, tiny_tokenizer, cfg):
    """A router whose only teacher runs as a Ray actor (one actor start shared by the tests below)."""
    config = Config(student={"path": str(tiny_model_dirs["student"])}, teachers={"t": cfg.model_dump()},
                    tasks=[{"name": "math", "env_id": "opd/Math-v0", "teacher": "t"}])
    router = TeacherRouter.from_config(config, student_vocab=tiny_tokenizer.get_vocab())
    yield router
    router.close()


@pytest.fixture(scope="module")
def local(cfg):
    return HFTeacher("t", cfg.model_copy(update={"ray_actor": False, "options": {}}))


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.sampled_logprobs, b.sampled_logprobs, atol=1e-6, rtol=0)


def test_router_runs_ray_actor_teacher_with_in_process_answers(router, local, samples, tiny_tokenizer):
    assert isinstance(router["math"], RemoteTeacher)
    assert_same(router.topk("math", samples, 6), local.topk(samples, 6))
    assert router["math"].vocab() == tiny_tokenizer.get_vocab()


def test_a_big_step_goes_in_calls_of_at_most_call_tokens(router, local, samples, monkeypatch):
    remote = router["math"]
    many = samples * 3  # 6 samples
    longest = max(len(s.input_ids) for s in many)
    monkeypatch.setattr(remote, "cfg", remote.cfg.model_copy(update={"call_tokens": 2 * longest}))
    calls = []
    real = remote._call
    monkeypatch.setattr(remote, "_call", lambda what, method, task=None: calls.append(what) or real(what, method, task))
    assert_same(remote.topk(many, 5), local.topk(many, 5))
    assert len(calls) == 3  # two samples per call
    ids = [torch.zeros(s.num_loss_tokens, 2, dtype=torch.long) for s in many]
    calls.clear()
    assert_same(remote.score(many, ids), local.score(many, ids))
    assert len(calls) == 3
    assert remote._batches([]) == []


def test_dead_actor_is_replaced_and_the_call_retried(router, local, samples):
    remote = router["math"]
    dead = remote.actor
    ray.kill(dead)
    assert_same(remote.topk(samples, 4), local.topk(samples, 4))
    assert remote.actor is not dead


def test_backend_errors_are_not_retried(router, samples):
    start = time.monotonic()
    with pytest.raises(TeacherError, match="teacher 't' \\(task 'math'\\).*failed inside the actor.*out of range"):
        router.topk("math", samples, 10_000)  # loss.k is checked at start-up; here the backend itself fails
    assert time.monotonic() - start < 10


class StuckTeacher(HFTeacher):
    """An hf teacher whose every call hangs past any sensible call timeout."""

    def topk(self, samples, k):
        time.sleep(30)

    def vocab(self):
        time.sleep(30)


STUCK = "tests.teachers.test_actor:StuckTeacher"


def test_persistent_failure_raises_after_bounded_retries(ray_cluster, cfg, samples):
    # Calls that always outlast the call timeout: every attempt times out, the actor is killed and the next attempt
    # starts a fresh one (waited for until it has started: start-up has its own bound), and the client gives up.
    options = {"ray_max_attempts": 2, "ray_backoff_s": 0.01}
    hopeless = cfg.model_copy(update={"backend": STUCK, "options": options, "call_timeout_s": 0.5})
    teacher = RemoteTeacher("slowpoke", hopeless, task="alfworld")
    start = time.monotonic()
    try:
        with pytest.raises(TeacherError, match="teacher 'slowpoke' \\(task 'math'\\): topk failed 2 times"):
            teacher.topk(samples, 4)
        assert teacher.actor is None  # the stuck actor is gone; nothing is left queued behind it
    finally:
        teacher.close()
    assert time.monotonic() - start < 60


class SlowStartTeacher(HFTeacher):
    """An hf teacher whose start-up (a big model's load) takes longer than one call may."""

    def __init__(self, *args, **kwargs) -> None:
        time.sleep(4.0)
        super().__init__(*args, **kwargs)


SLOW = "tests.teachers.test_actor:SlowStartTeacher"


def test_a_slow_starting_teacher_is_waited_for_not_killed(ray_cluster, cfg, samples):
    slow = cfg.model_copy(update={"backend": SLOW, "call_timeout_s": 2.0, "start_timeout_s": 60.0,
                                  "options": {"ray_max_attempts": 1}})
    teacher = RemoteTeacher("slow", slow, task="math")
    try:
        first = teacher.actor
        assert len(teacher.topk(samples, 4)) == len(samples)  # one attempt of 2 s, after a 4 s start: no kill
        assert teacher.actor is first
    finally:
        teacher.close()


def test_a_teacher_that_cannot_start_in_time_is_one_clear_error(ray_cluster, cfg):
    slow = cfg.model_copy(update={"backend": SLOW, "start_timeout_s": 1.0})
    start = time.monotonic()
    with pytest.raises(TeacherError, match=r"teacher 'slow' \(task 'math'\): its Ray actor did not start within "
                                           r"teachers.slow.start_timeout_s = 1 s"):
        RemoteTeacher("slow", slow, task="math")
    assert time.monotonic() - start < 10
