"""Credentials out of everything the config shows: config.yaml, W&B, error messages.

An option key *ending* in a credential word (`hf_token`, `openai_api_key`, `password`) holds a secret, so that
`max_new_tokens`, `token_budget` or `special_tokens` are never taken for one. `short_repr` bounds what an error
message quotes of a user's value, redacted.
"""
from __future__ import annotations

import re
import reprlib
from typing import Any

_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:token|secret|password|passwd|passphrase|api[_-]?key|secret[_-]?key|"
                         r"access[_-]?key|private[_-]?key|credentials?|auth|authorization|cookie)$", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """`value` with every mapping entry whose key names a credential replaced by REDACTED (recursively)."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def short_repr(value: Any, limit: int = 200) -> str:
    """A bounded repr for messages: a huge or deeply nested input never floods (or expands in) an error."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = r.maxtuple = r.maxset = 8
    r.maxlevel = 3
    return r.repr(redact(value))
