"""Teacher-side re-rendering: the teacher's own template/system prompt around the student's verbatim responses."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.config import TeacherConfig
from teachers.hf import HFTeacher
from teachers.templates import TemplateAlignmentError, teacher_view, teacher_views

# Same special tokens as the student's ChatML, different role markers ("role:" lines).
TEACHER_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ':\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant:\\n' }}{%- endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are a careful solver."},
    {"role": "user", "content": "Your task is to: put a clean apple in fridge."},
    {"role": "assistant", "content": "<action>go to countertop 1</action>"},
    {"role": "user", "content": "On the countertop 1, you see a apple 1."},
    {"role": "assistant", "content": "<action>take apple 1 from countertop 1</action>"},
    {"role": "user", "content": "Nothing happens."},
]
SYSTEM = "You are the teacher. Think first."


@pytest.fixture(scope="module")
def sample(tiny_tokenizer, make_chat_sample):
    return make_chat_sample(tiny_tokenizer, MESSAGES, task="alfworld")


def hand_built(tok, sample):
    """The teacher sequence written out by hand: teacher-rendered template text + the student's response ids."""
    (s0, e0), (s1, e1) = sample.turn_spans
    seg0 = tok.encode(f"<|im_start|>system:\n{SYSTEM}<|im_end|>\n<|im_start|>user:\n{MESSAGES[1]['content']}"
                      "<|im_end|>\n<|im_start|>assistant:\n", add_special_tokens=False)
    seg1 = tok.encode(f"\n<|im_start|>user:\n{MESSAGES[3]['content']}<|im_end|>\n<|im_start|>assistant:\n",
                      add_special_tokens=False)
    ids = seg0 + sample.input_ids[s0:e0] + seg1 + sample.input_ids[s1:e1]
    second = len(seg0) + (e0 - s0) + len(seg1)
    positions = [len(seg0) + i for i in range(e0 - s0)] + [second + i for i in range(e1 - s1)]
    return ids, positions


def test_view_is_identity_without_template(tiny_tokenizer, sample):
    view = teacher_view(sample, tiny_tokenizer)
    assert view.input_ids == sample.input_ids and view.positions == sample.loss_positions()


def test_rerendered_view_keeps_responses_verbatim(tiny_tokenizer, sample):
    view = teacher_view(sample, tiny_tokenizer, TEACHER_TEMPLATE, SYSTEM)
    assert (view.input_ids, view.positions) == hand_built(tiny_tokenizer, sample)
    assert [view.input_ids[p] for p in view.positions] == [sample.input_ids[t] for t in sample.loss_positions()]
    assert view.input_ids != sample.input_ids


def test_teacher_topk_on_rerendered_sequence(tiny_model_dirs, tiny_tokenizer, sample):
    cfg = TeacherConfig(model=str(tiny_model_dirs["teacher"]), chat_template=TEACHER_TEMPLATE, system_prompt=SYSTEM)
    got = HFTeacher("teacher", cfg).topk([sample], 6)[0]
    ids, positions = hand_built(tiny_tokenizer, sample)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    rows = logp[torch.tensor(positions) - 1]
    vals, top = rows.topk(6, dim=-1)
    assert got.topk_ids.shape[0] == sample.num_loss_tokens
    assert torch.equal(got.topk_ids, top)
    torch.testing.assert_close(got.topk_logprobs, vals, atol=1e-5, rtol=0)
    sampled = rows.gather(-1, torch.tensor(ids)[torch.tensor(positions), None]).squeeze(-1)
    torch.testing.assert_close(got.sampled_logprobs, sampled, atol=1e-5, rtol=0)


def test_system_prompt_alone_uses_tokenizer_template(tiny_tokenizer, make_chat_sample):
    sample = make_chat_sample(tiny_tokenizer, MESSAGES[1:3])
    view = teacher_view(sample, tiny_tokenizer, system_prompt=SYSTEM)
    prefix = tiny_tokenizer.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", add_special_tokens=False)
    assert view.input_ids[:len(prefix)] == prefix
    assert view.input_ids[len(prefix):] == sample.input_ids[:sample.turn_spans[0][1]]


def test_template_that_rewrites_history_starts_a_new_teacher_sequence(tiny_tokenizer, sample):
    """History rendered differently from the live turn: turn 2 gets its own sequence, the teacher's rendering of the
    conversation so far (upper-cased history) + the verbatim response; one-sequence callers get an error."""
    stripping = TEACHER_TEMPLATE.replace("message['content']", "message['content'] | upper")
    views = teacher_views(sample, tiny_tokenizer, stripping)
    (s0, e0), (s1, e1) = sample.turn_spans
    assert [v.positions for v in views] == [[p - s0 + views[0].positions[0] for p in range(s0, e0)],
                                            [p - s1 + views[1].positions[0] for p in range(s1, e1)]]
    second = views[1]
    expected = tiny_tokenizer.apply_chat_template(MESSAGES[:4], chat_template=stripping, add_generation_prompt=True,
                                                  tokenize=False)
    assert second.input_ids == tiny_tokenizer.encode(expected, add_special_tokens=False) + sample.input_ids[s1:e1]
    with pytest.raises(TemplateAlignmentError, match="teacher_views"):
        teacher_view(sample, tiny_tokenizer, stripping)


def test_spans_must_match_assistant_messages(tiny_tokenizer, sample):
    broken = type(sample)(**{**sample.__dict__, "turn_spans": sample.turn_spans[:1]})
    with pytest.raises(TemplateAlignmentError, match="turn_spans"):
        teacher_view(broken, tiny_tokenizer, TEACHER_TEMPLATE)
