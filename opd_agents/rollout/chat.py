"""Chat-template rendering to token ids, including the incremental (append-only) form used in conversations.

In conversation mode the sequence grows as: prompt ids + generated ids (verbatim) + ids of the template
text between the end of that response and the next generation prompt. The student's own tokens are never
decoded and re-tokenised (that can change ids). The in-between text is found by rendering the chat before the response
and with the response and the follow-up message, and taking what follows the response, which requires a
prefix-stable template: rendering more messages must only append text, and earlier assistant turns must render
as their content verbatim. Templates that rewrite history (e.g. drop earlier reasoning) are rejected
with an error naming the fix. Rendering is bounded in output and time (`opd_agents.chat_templates`).
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from opd_agents.chat_templates import render_with_tokenizer

Messages = list[dict[str, str]]


class TemplateError(ValueError):
    """The chat template cannot be extended incrementally."""


class ChatEncoder:
    """Renders messages with the student's chat template and encodes the text without extra special tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return render_with_tokenizer(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                     name="the student's chat template")

    def encode(self, text: str) -> list[int]:
        # The template already writes any BOS/special text; adding special tokens would double them.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids of the chat followed by the assistant generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def continuation_ids(self, messages: Messages, response: str, stop_text: str | None,
                         followup: dict[str, str]) -> list[int]:
        """Ids to append after a generated response so the sequence continues with `followup` + generation prompt.

        messages: the chat before the response; response: its decoded text without the stop token;
        stop_text: the decoded stop token when the response ended with one (it is already in the ids).
        """
        before = self.render(messages, add_generation_prompt=True)
        # Rendered with the follow-up, the response is history: no template treats it as the final turn (Qwen3's
        # writes `<think>\n\n</think>\n\n` before a final assistant turn only), so the text around it is the
        # text the next prompt really has.
        after = self.render(messages + [{"role": "assistant", "content": response}, followup],
                            add_generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError(self._unstable("adding a turn rewrote earlier text"))
        if not after[len(before):].startswith(response):
            raise TemplateError(self._unstable("the template changes the assistant's content in the history (e.g. "
                                               "trims it, or drops a <think> block)"))
        closing = after[len(before) + len(response):]
        if stop_text and closing.startswith(stop_text):
            closing = closing[len(stop_text):]
        return self.encode(closing)

    @staticmethod
    def _unstable(why: str) -> str:
        return (f"the student's chat template is not prefix-stable ({why}), so a conversation cannot be extended "
                "without re-tokenising the student's tokens; set student.chat_template to a template that only "
                "appends, or use sample_mode: per_turn for this task.")
