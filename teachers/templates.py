"""Teacher-side view of a sample: the token sequence(s) the teacher scores, and where the student's loss positions are.

Without a teacher chat template or system prompt the teacher scores `sample.input_ids` exactly as the student saw
them. With `teachers.<name>.chat_template` / `system_prompt` set, the non-response parts of the conversation
(system/user/environment messages and template markers) are re-rendered with the teacher's own template, while the
student's response tokens are kept verbatim — the teacher must judge the tokens the student actually produced, so
student and teacher must share a vocabulary (see teachers/vocab.py).

Why: a teacher prompted in a format it was not trained on gives biased log-probs on every token (tinker-cookbook
issue #796: a base-model student rendered `User: … Assistant:` while the chat teacher expected ChatML, and the
teacher's log-probs were off by ~0.3 nats/token until the prompt was re-rendered with the teacher's renderer).

What the teacher sees for assistant turn i (assistant message a_i, student span (s_i, e_i)) is always
  P_i = teacher_template(messages[:a_i], add_generation_prompt=True)   followed by   input_ids[s_i:e_i] (verbatim),
i.e. the conversation so far exactly as the teacher's own template renders it, as if the teacher were generating
turn i itself. Consecutive turns share one teacher sequence when the template is prefix-stable across them:
  1. while P_i starts with the text already covered (the previous P_{i-1} plus the decoded previous response), the
     remainder — the end of the previous turn as the teacher renders it, the following user/tool messages and the
     generation prompt — is tokenized on its own and appended, then the response ids;
  2. otherwise a new teacher sequence starts: tokens of P_i, then the response ids. Templates that render history
     differently from the live turn need this: Qwen3's drops `<think>…</think>` from earlier assistant turns, and
     with `enable_thinking=false` its generation prompt ends in `<think>\n\n</think>\n\n`, which history lacks.
A sample thus has one or more `TeacherView`s (one per sequence); each student loss position t in span i maps to
position start_i + (t - s_i) of its sequence. Outputs stay per student loss position, in order: concatenating the
views' positions in order gives the sample's loss positions one to one. Shapes: `TeacherView.positions` (N_v,),
sum over the views of N_v = N.

Limits (each is a clear `TemplateAlignmentError`, never a silent misalignment):
  - `turn_spans` belong to the last assistant messages, one each (earlier assistant messages are history inside
    the prompt, as in a per-turn sample of a chat adapter), and every loss position must lie in a span;
  - segments are tokenized separately, so a BPE merge across a response boundary is not reproduced (the student's
    own rollout builds its sequence the same way, turn by turn).
Messages after the last assistant turn carry no loss positions and are left out of the teacher sequences.
Templates render in a bounded sandbox (`opd_agents.chat_templates`): a failing one is a `ChatTemplateError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opd_agents.chat_templates import render_with_tokenizer
from opd_agents.samples import Sample


class TemplateAlignmentError(ValueError):
    """The teacher's re-rendered conversation cannot be aligned with the student's response tokens."""


@dataclass
class TeacherView:
    """input_ids: (T',) one sequence the teacher scores; positions: (N_v,) teacher positions of the student loss
    positions it covers.

    The teacher's next-token distribution for positions[j] comes from its logits at positions[j] - 1, and the
    scored (sampled) token is input_ids[positions[j]].
    """

    input_ids: list[int]
    positions: list[int]


def uses_teacher_template(chat_template: str | None, system_prompt: str | None) -> bool:
    return chat_template is not None or system_prompt is not None


def teacher_views(sample: Sample, tokenizer: Any, chat_template: str | None = None,
                  system_prompt: str | None = None) -> list[TeacherView]:
    """The identity view, or the re-rendered sequences when a teacher template or system prompt is configured."""
    if not uses_teacher_template(chat_template, system_prompt):
        return [TeacherView(list(sample.input_ids), sample.loss_positions())]
    return rerender(sample, tokenizer, chat_template, system_prompt)


def teacher_view(sample: Sample, tokenizer: Any, chat_template: str | None = None,
                 system_prompt: str | None = None) -> TeacherView:
    """The single teacher sequence of `sample`, for backends that score one sequence per sample.

    Raises TemplateAlignmentError when the teacher template needs several sequences (see the module docstring);
    backends should prefer `teacher_views`."""
    views = teacher_views(sample, tokenizer, chat_template, system_prompt)
    if len(views) != 1:
        raise TemplateAlignmentError(
            f"sample {sample.episode_id!r}: the teacher template renders earlier assistant turns differently from "
            f"the live turn, so the teacher needs {len(views)} sequences for this sample; score it with "
            "teachers.templates.teacher_views, or use sample_mode: per_turn for this task")
    return views[0]


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Replace the leading system message's content, or insert one, when `system_prompt` is given."""
    msgs = [dict(m) for m in messages]
    if system_prompt is None:
        return msgs
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = system_prompt
        return msgs
    return [{"role": "system", "content": system_prompt}, *msgs]


def rerender(sample: Sample, tokenizer: Any, chat_template: str | None,
             system_prompt: str | None) -> list[TeacherView]:
    """Build the teacher sequences segment by segment (see the module docstring) and map the loss positions."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise TemplateAlignmentError(
            "teacher system_prompt is set but the teacher tokenizer has no chat template; "
            "set teachers.<name>.chat_template")
    msgs = with_system_prompt(sample.messages, system_prompt)
    assistant_idx = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    spans = sample.turn_spans
    # Extra leading assistant messages are history inside a per-turn prompt: allowed only when the spans are the
    # trailing turns, i.e. the sample ends with its last response and the chat with the last assistant message.
    trailing = bool(spans) and spans[-1][1] == len(sample.input_ids) and msgs[-1].get("role") == "assistant"
    if len(assistant_idx) < len(spans) or (len(assistant_idx) > len(spans) and not trailing):
        raise TemplateAlignmentError(
            f"sample {sample.episode_id!r} has {len(assistant_idx)} assistant messages but {len(spans)} turn_spans; "
            "re-rendering for the teacher needs a span per assistant message (earlier assistant messages may be "
            "history only in a sample that ends with its last response)")
    assistant_idx = assistant_idx[len(assistant_idx) - len(spans):]

    sequences: list[list[int]] = []
    starts: list[tuple[int, int]] = []  # per turn: (sequence index, start of its response in that sequence)
    covered = None  # text of the current sequence so far; None before the first sequence starts
    for a, (s, e) in zip(assistant_idx, spans):
        prompt = render_with_tokenizer(tokenizer, msgs[:a], add_generation_prompt=True, chat_template=chat_template,
                                       name="the teacher's chat template")
        if covered is None or not prompt.startswith(covered):
            sequences.append([])
            covered = ""
        ids = sequences[-1]
        ids += tokenizer.encode(prompt[len(covered):], add_special_tokens=False)
        starts.append((len(sequences) - 1, len(ids)))
        response = list(sample.input_ids[s:e])
        ids += response
        covered = prompt + tokenizer.decode(response, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    positions: list[list[int]] = [[] for _ in sequences]
    for t in sample.loss_positions():  # spans are in order, so the views' positions concatenate in order
        seq, p = _map_position(t, sample, starts)
        positions[seq].append(p)
    return [TeacherView(ids, pos) for ids, pos in zip(sequences, positions) if pos]


def _map_position(t: int, sample: Sample, starts: list[tuple[int, int]]) -> tuple[int, int]:
    """(teacher sequence, position in it) of student loss position t."""
    for (s, e), (seq, start) in zip(sample.turn_spans, starts):
        if s <= t < e:
            if start + (t - s) == 0:
                raise TemplateAlignmentError(
                    f"sample {sample.episode_id!r}: the teacher sequence starts with a loss token, which has no prefix "
                    "to be predicted from; the teacher template must render something before the first response")
            return seq, start + (t - s)
    raise TemplateAlignmentError(
        f"sample {sample.episode_id!r}: loss position {t} lies outside every turn span {sample.turn_spans}; "
        "only student response tokens can be re-rendered for the teacher")
