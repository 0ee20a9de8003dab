"""The config's shape as a reader meets it: the generated reference is fresh, help texts are short and say what, not
why (that is docs/configuration.md), validators follow their fields, and keys that moved name their new place."""
from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from opd_agents.config import ConfigError, build_config, schema
from opd_agents.config.loading import MOVED
from opd_agents.config.reference import markdown
from tests.config.test_config import _data

ROOT = Path(__file__).resolve().parents[2]
HELP_MAX_CHARS = 200  # two lines of a terminal's or the reference table's width


def _sections() -> list[type[BaseModel]]:
    return [c for _, c in inspect.getmembers(schema, inspect.isclass)
            if issubclass(c, BaseModel) and c.__module__ == schema.__name__ and c.model_fields]


def test_docs_config_md_is_the_generated_reference():
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == markdown(), (
        "docs/config.md is stale: python -m opd_agents.config --markdown > docs/config.md")


def test_the_cli_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "opd_agents.config", "--markdown"], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120).stdout
    assert out == markdown()
    assert "## `fidelity`" in out and "## `tasks[]`" in out and "## `teachers.<name>`" in out
    assert "## `learner.lora`" in out


def test_every_section_and_field_is_in_the_reference():
    text = markdown()
    for section in _sections():
        for name in section.model_fields:
            assert f"| `{name}` |" in text, f"{section.__name__}.{name} is missing from the reference"


def test_help_texts_are_at_most_two_lines_and_name_no_issue():
    for section in _sections():
        for name, field in section.model_fields.items():
            text = field.description or ""
            assert text, f"{section.__name__}.{name} has no help text"
            assert len(text) <= HELP_MAX_CHARS, f"{section.__name__}.{name}: {len(text)} characters of help"
            assert not re.search(r"\bissue \d+", text), f"{section.__name__}.{name} names an issue number"


def test_validators_come_after_their_sections_fields():
    tree = ast.parse(inspect.getsource(schema))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        seen_function = False
        for node in cls.body:
            if isinstance(node, ast.FunctionDef):
                seen_function = True
            elif isinstance(node, ast.AnnAssign):
                assert not seen_function, f"{cls.name}.{ast.unparse(node.target)} follows a method"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_key_fails_naming_its_new_place(old):
    section, key = old.split(".")
    data = _data()
    data[section] = {key: 1}
    for how in (lambda: build_config(data), lambda: build_config(_data(), [f"{old}=1"])):
        with pytest.raises(ConfigError, match=re.escape(f"{old} moved to {MOVED[old]}")):
            how()


def test_the_fidelity_section_takes_the_moved_settings():
    cfg = build_config(_data(), ["fidelity.every=5", "fidelity.positions=64", "fidelity.min_cosine=0.1",
                                 "fidelity.patience=0"])
    assert (cfg.fidelity.every, cfg.fidelity.positions, cfg.fidelity.min_cosine, cfg.fidelity.patience) == (
        5, 64, 0.1, 0)
