"""The config's error type and how schema violations read: one line per problem, naming the key and the fix.

`format_validation_error` turns a pydantic `ValidationError` into that text: an unknown key gets the closest valid
key and the section's valid keys, a missing key is named, a bad value is shown bounded and redacted
(`redaction.short_repr`).
"""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from opd_agents.config.redaction import short_repr

_KEY_SHOWN = 80  # a key longer than this is shown cut (a 100,000-character key must not flood the message)


class ConfigError(ValueError):
    """A config problem, with a message meant for the user (names the key and the fix)."""


def section_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at `loc` (a pydantic error location) under the schema `model`."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return sorted(current.model_fields) if current is not None else []


def format_validation_error(err: ValidationError, root: type[BaseModel]) -> str:
    """The user's message for `err`, raised validating data against the schema `root`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        key = key if len(key) <= _KEY_SHOWN else f"{key[:_KEY_SHOWN]}... ({len(key):,} characters)"
        if e["type"] == "extra_forbidden":
            valid = section_fields(root, e["loc"])
            name = str(e["loc"][-1])
            close = difflib.get_close_matches(name, valid, n=1) if len(name) <= _KEY_SHOWN else []
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {key!r}.{hint} Valid keys here: {valid}")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}")
        else:
            lines.append(f"{key}: {e['msg']} (got {short_repr(e.get('input'))})")
    return "invalid config:\n  " + "\n  ".join(lines)
