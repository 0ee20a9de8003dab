"""Final-answer extraction: find the answer a response commits to, as plain string operations.

Owns the answer formats the math environment understands and nothing else; no sympy, no grading. Every
function here is linear in the response length and never raises on arbitrary text (100 kB, binary junk,
unbalanced braces), so the adapter and the env can call it on raw model output.

Formats (``ANSWER_FORMATS``):
- ``"boxed"`` (default): the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or the brace-less
  ``\\boxed 5``). LaTeX-escaped braces ``\\{ \\}`` inside do not count for nesting. If the last box is
  unbalanced (a truncated response) there is no answer: an earlier box is a superseded answer, not the final one.
- ``"answer_line"``: the last line of the form ``Answer: X`` (DAPO-Math-17K's own prompt format);
  surrounding ``$`` and ``**`` are dropped.
- ``"raw"``: the whole response, stripped (for data whose model output is the bare answer).
"""
from __future__ import annotations

import re

ANSWER_FORMATS = ("boxed", "answer_line", "raw")
# Longest response the env grades (its Text spaces' max_length); a longer one has no answer, by the env's rule.
MAX_TEXT_LENGTH = 100_000

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_BOX_ARGUMENT = re.compile(r"\s*([^\s${}]+)")
# Matched at the start of one line at a time (``re.match``): every quantifier is followed by a literal it cannot
# contain, so a failed attempt costs at most one pass over the line. The former whole-text pattern ended in a lazy
# ``(.*?)[ \t]*$``, which is quadratic in a whitespace run (~55 s on 100 kB).
_ANSWER_PREFIX = re.compile(r"[ \t*]*(?:final[ \t]+)?answer[ \t*]*:", re.IGNORECASE)


def _balanced_group(text: str, open_at: int) -> str | None:
    """Content of the ``{...}`` group whose ``{`` is at ``open_at``; None when it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (``\\{``, ``\\}``, ``\\\\``) never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The stripped content of the last ``\\boxed``/``\\fbox`` in ``text``, or None if there is none."""
    last = None
    for match in _BOX_COMMAND.finditer(text):
        last = match
    if last is None:
        return None
    rest = last.end()
    while rest < len(text) and text[rest] in " \t":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        content = _balanced_group(text, rest)
    else:
        bare = _BARE_BOX_ARGUMENT.match(text, last.end())
        content = bare.group(1) if bare else None
    if content is None or not content.strip():
        return None
    return content.strip()


def _last_answer_line(text: str) -> str | None:
    """The answer of the last ``Answer: X`` line; an empty last answer line gives None."""
    for line in reversed(text.split("\n")):
        prefix = _ANSWER_PREFIX.match(line)
        if prefix is not None:
            answer = line[prefix.end() :].strip().strip("*").strip().strip("$").strip()
            return answer or None
    return None


def extract_answer(response: str, answer_format: str = "boxed") -> str | None:
    """The final answer ``response`` commits to in ``answer_format``, or None when it gives none."""
    if answer_format == "boxed":
        return last_boxed(response)
    if answer_format == "answer_line":
        return _last_answer_line(response)
    if answer_format == "raw":
        return response.strip() or None
    raise ValueError(f"unknown answer_format {answer_format!r}; choose one of {', '.join(ANSWER_FORMATS)}")


def as_text(response: object) -> str:
    """Model output as ``str``: bytes are decoded leniently and anything else is ``str()``-ed, so odd
    callers get a format error instead of a crash."""
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", errors="replace")
    return "" if response is None else str(response)
