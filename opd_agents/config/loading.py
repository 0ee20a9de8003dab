"""From YAML text and `a.b.c=value` overrides to a validated `Config`, and back to YAML for the run directory.

`load_config(path, overrides)` parses the YAML (`opd_agents.safe_yaml`), applies the overrides (values parsed as
YAML scalars; list items addressed by index or, for `tasks`, by task name) and validates the schema. Keys that moved
to another section fail with a message naming their new place (`MOVED`). What needs the registries or the disk (env
ids, teacher backends, loss names, model folders) is checked later by `opd_agents.run.preflight`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from opd_agents import safe_yaml
from opd_agents.config.errors import ConfigError, format_validation_error
from opd_agents.config.redaction import redact, short_repr
from opd_agents.config.schema import Config

# Old key -> its new place: a config written for an earlier release fails with the new key's name, never silently.
MOVED = {
    "loss.fidelity_every": "fidelity.every",
    "loss.fidelity_positions": "fidelity.positions",
    "loss.fidelity_min_cosine": "fidelity.min_cosine",
    "loss.fidelity_patience": "fidelity.patience",
    "rollout.envs_per_worker": "rollout.max_concurrent_episodes",
}


# Longer keys or deeper paths than any config has: refused before they reach the schema (or an error message).
MAX_KEY_CHARS = 200
MAX_KEY_PARTS = 16


def _moved_keys(data: dict[str, Any]) -> list[str]:
    found = []
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            found.append(f"{old} moved to {new}")
    return found


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, ".".join(parts[:i]))
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])!r} is a value, not a section")


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [it.get("name") for it in items if isinstance(it, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(f"override: {where}.{part} does not exist; use an index 0..{len(items) - 1} or a name from "
                      f"{names}")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override {short_repr(text, 80)} must look like section.key=value (e.g. loss.k=64)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {short_repr(text)} has an empty key")
    if len(key.strip()) > MAX_KEY_CHARS or key.count(".") >= MAX_KEY_PARTS:
        raise ConfigError(f"override key {short_repr(key.strip(), 60)} ({len(key.strip()):,} characters, "
                          f"{key.count('.') + 1} parts) is not a config key; keys are at most {MAX_KEY_CHARS} "
                          f"characters and {MAX_KEY_PARTS} dotted parts (e.g. loss.k=64)")
    try:
        return key.strip(), safe_yaml.load(raw) if raw.strip() else ""
    except safe_yaml.YAMLInputError as exc:
        raise ConfigError(f"override {key.strip()!r}: the value is not valid YAML: {exc}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in the config file `path` (a regular UTF-8 file of at most `safe_yaml.MAX_BYTES`)."""
    from envs.user_files import UserFileError, read_text

    try:
        text = read_text(path, safe_yaml.MAX_BYTES, "config file")
        data = safe_yaml.load(text)
    except UserFileError as exc:
        raise ConfigError(str(exc)) from None
    except safe_yaml.YAMLInputError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Apply overrides to raw data and validate the schema."""
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    moved = _moved_keys(data)
    if moved:
        raise ConfigError("invalid config:\n  " + "\n  ".join(moved))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, Config)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load YAML, apply `key=value` overrides and validate the schema (references: `run.preflight`)."""
    return build_config(load_yaml(path), overrides)


def config_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data with credentials redacted (what config.yaml, W&B and messages may show)."""
    return redact(cfg.model_dump(mode="json"))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
