"""Teacher-side view of a sample: which token sequence the teacher scores, and where the student's loss positions are.

Without a teacher chat template or system prompt the teacher scores `sample.input_ids` exactly as the student saw
them. With `teachers.<name>.chat_template` / `system_prompt` set, the non-response parts of the conversation
(system/user/environment messages and template markers) are re-rendered with the teacher's own template, while the
student's response tokens are kept verbatim — the teacher must judge the tokens the student actually produced, so
student and teacher must share a vocabulary (see teachers/vocab.py).

Why: a teacher prompted in a format it was not trained on gives biased log-probs on every token (tinker-cookbook
issue #796: a base-model student rendered `User: … Assistant:` while the chat teacher expected ChatML, and the
teacher's log-probs were off by ~0.3 nats/token until the prompt was re-rendered with the teacher's renderer).

How the teacher sequence is built, one assistant turn i at a time (assistant message a_i, student span (s_i, e_i)):
  1. P_i = teacher_template(messages[:a_i], add_generation_prompt=True) as text;
  2. P_i must start with the text already covered (the previous P_{i-1} plus the decoded previous response); the
     remainder — the end of the previous assistant turn as the teacher renders it, the following user/tool messages,
     and the teacher's generation prompt — is tokenized on its own and appended;
  3. the student's response ids `input_ids[s_i:e_i]` are appended unchanged; the covered text becomes
     P_i + decode(response ids).
Each student loss position t in span i maps to teacher position start_i + (t - s_i). Outputs stay per student loss
position, in order. Shapes: `TeacherView.positions` has one entry per student loss position (N,).

Limits (each is a clear `TemplateAlignmentError`, never a silent misalignment):
  - the teacher template must render earlier assistant turns as their exact decoded response text (templates that
    strip whitespace or drop `<think>` blocks from history, or end turns with a different end-of-turn marker than
    the student's response, do not fit — response tokens are verbatim by design);
  - assistant messages and `turn_spans` must correspond one to one, and every loss position must lie in a span;
  - segments are tokenized separately, so a BPE merge across a response boundary is not reproduced (the student's
    own rollout builds its sequence the same way, turn by turn).
Messages after the last assistant turn carry no loss positions and are left out of the teacher sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opd_agents.samples import Sample


class TemplateAlignmentError(ValueError):
    """The teacher's re-rendered conversation cannot be aligned with the student's response tokens."""


@dataclass
class TeacherView:
    """input_ids: (T',) the sequence the teacher scores; positions: (N,) teacher position of each student loss position.

    The teacher's next-token distribution for positions[j] comes from its logits at positions[j] - 1, and the
    scored (sampled) token is input_ids[positions[j]].
    """

    input_ids: list[int]
    positions: list[int]


def uses_teacher_template(chat_template: str | None, system_prompt: str | None) -> bool:
    return chat_template is not None or system_prompt is not None


def teacher_view(sample: Sample, tokenizer: Any, chat_template: str | None = None,
                 system_prompt: str | None = None) -> TeacherView:
    """The identity view, or the re-rendered one when a teacher template or system prompt is configured."""
    if not uses_teacher_template(chat_template, system_prompt):
        return TeacherView(list(sample.input_ids), sample.loss_positions())
    return rerender(sample, tokenizer, chat_template, system_prompt)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Replace the leading system message's content, or insert one, when `system_prompt` is given."""
    msgs = [dict(m) for m in messages]
    if system_prompt is None:
        return msgs
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = system_prompt
        return msgs
    return [{"role": "system", "content": system_prompt}, *msgs]


def rerender(sample: Sample, tokenizer: Any, chat_template: str | None, system_prompt: str | None) -> TeacherView:
    """Build the teacher sequence segment by segment (see the module docstring) and map the loss positions."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise TemplateAlignmentError(
            "teacher system_prompt is set but the teacher tokenizer has no chat template; "
            "set teachers.<name>.chat_template")
    msgs = with_system_prompt(sample.messages, system_prompt)
    assistant_idx = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    if len(assistant_idx) != len(sample.turn_spans):
        raise TemplateAlignmentError(
            f"sample {sample.episode_id!r} has {len(assistant_idx)} assistant messages but "
            f"{len(sample.turn_spans)} turn_spans; re-rendering for the teacher needs one span per assistant message")

    ids: list[int] = []
    starts: list[int] = []
    covered = ""
    for a, (s, e) in zip(assistant_idx, sample.turn_spans):
        prompt = tokenizer.apply_chat_template(msgs[:a], chat_template=chat_template, add_generation_prompt=True,
                                               tokenize=False)
        if not prompt.startswith(covered):
            raise TemplateAlignmentError(
                f"sample {sample.episode_id!r}: the teacher template does not render the previous assistant turn as "
                f"the student's exact response text (expected the rendering to continue {covered[-60:]!r}, got "
                f"{prompt[:len(covered)][-60:]!r}). Response tokens are kept "
                "verbatim, so use a teacher template that keeps assistant history and end-of-turn markers unchanged")
        ids += tokenizer.encode(prompt[len(covered):], add_special_tokens=False)
        starts.append(len(ids))
        response = list(sample.input_ids[s:e])
        ids += response
        covered = prompt + tokenizer.decode(response, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    positions = [_map_position(t, sample, starts) for t in sample.loss_positions()]
    return TeacherView(ids, positions)


def _map_position(t: int, sample: Sample, starts: list[int]) -> int:
    for (s, e), start in zip(sample.turn_spans, starts):
        if s <= t < e:
            if start + (t - s) == 0:
                raise TemplateAlignmentError(
                    f"sample {sample.episode_id!r}: the teacher sequence starts with a loss token, which has no prefix "
                    "to be predicted from; the teacher template must render something before the first response")
            return start + (t - s)
    raise TemplateAlignmentError(
        f"sample {sample.episode_id!r}: loss position {t} lies outside every turn span {sample.turn_spans}; "
        "only student response tokens can be re-rendered for the teacher")
