"""Credentials out of everything the config shows: config.yaml, W&B, error messages.

Two rules, either one redacts:
  - by key name: a key whose last word is a credential word (`hf_token`, `githubToken`, `GithubToken`,
    `github-token`, `OPENAI_API_KEY`, `password`, `apiKey`) holds a secret, whatever its case style; the key is split
    into words at `_`, `-`, `.`, spaces and lower-to-upper case changes, so `max_new_tokens`, `token_budget` and
    `special_tokens` are never taken for one, nor are a tokenizer's special-token names (`eos_token`, `pad_token`);
  - by value shape: any string holding a token of a known format (Hugging Face `hf_...`, GitHub `ghp_...` /
    `github_pat_...`, OpenAI / Anthropic `sk-...`, AWS `AKIA...`, Slack `xox[bpaors]-...`, Google `AIza...`, JWTs)
    has that token replaced, wherever it sits (a URL, a header value, a list item). The formats are specific
    enough (prefix, length, and mixed case for `hf_` / `sk-` keys) that SHA-256 digests, hub ids (`org/name`) and
    paths are left as they are.
`short_repr` bounds what an error message quotes of a user's value, redacted.
"""
from __future__ import annotations

import re
import reprlib
from typing import Any

REDACTED = "<redacted>"

_WORD_BREAK = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "apikey", "credential", "credentials", "auth",
                 "authorization", "cookie", "pat"}
_SECRET_PAIRS = {("api", "key"), ("secret", "key"), ("access", "key"), ("private", "key"), ("access", "token"),
                 ("client", "secret"), ("session", "key"), ("signing", "key")}
# Tokenizer special-token names: a vocabulary entry, not a credential.
_TOKENIZER_WORDS = {"bos", "eos", "pad", "unk", "sep", "cls", "mask", "stop", "im", "end", "start", "eot", "special"}
_FLAT_SECRET = re.compile(r"^(?:[a-z]*(?:access|auth|bearer|refresh|github|gh|hf|hub|openai|wandb|slack|api)token|"
                          r"[a-z]*apikey|[a-z]*secretkey|[a-z]*accesskey|[a-z]*privatekey|[a-z]*password)$")
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"hf_(?=[A-Za-z0-9]*[A-Z])(?=[A-Za-z0-9]*[a-z])[A-Za-z0-9]{30,}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|sk-(?=[A-Za-z0-9_-]*[A-Z])(?=[A-Za-z0-9_-]*[a-z])(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{32,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|xox[bpaors]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r")(?![A-Za-z0-9_-])")


def secret_key(key: str) -> bool:
    """Whether an option key names a credential (see the module docstring)."""
    words = [w.lower() for w in _WORD_BREAK.split(key) if w]
    if not words:
        return False
    if len(words) == 1:
        return words[0] in _SECRET_WORDS or bool(_FLAT_SECRET.match(words[0]))
    if words[-1] == "token" and words[-2] in _TOKENIZER_WORDS:
        return False
    return words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS or bool(_FLAT_SECRET.match(words[-1]))


def scrub(text: str) -> str:
    """`text` with every token of a known format replaced by REDACTED."""
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """`value` with every mapping entry whose key names a credential replaced by REDACTED, and every token of a
    known format inside a string replaced too (recursively)."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return scrub(value)
    return value


def short_repr(value: Any, limit: int = 200) -> str:
    """A bounded repr for messages: a huge or deeply nested input never floods (or expands in) an error."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = r.maxtuple = r.maxset = 8
    r.maxlevel = 3
    return r.repr(redact(value))
