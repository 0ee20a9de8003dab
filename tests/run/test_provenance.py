"""Provenance of stored results: the config hash ignores where a run lives but not what it does, the commit comes
from git (or is None outside a checkout), and stored paths carry no machine folder."""
from __future__ import annotations

import subprocess
from pathlib import Path

from opd_agents.config import build_config
from opd_agents.run import provenance
from tests.run.test_train_e2e import tiny_run_data


def test_config_hash_ignores_the_runs_place_but_not_its_settings(tmp_path):
    data = tiny_run_data(tmp_path, {"student": tmp_path / "s", "teacher": tmp_path / "t"}, "a", 2)
    base = provenance.config_sha256(build_config(data, []))
    moved = provenance.config_sha256(build_config(data, ["run.name=b", f"run.output_dir={tmp_path / 'elsewhere'}"]))
    assert base == moved and len(base) == 64
    assert provenance.config_sha256(build_config(data, ["run.seed=7"])) != base
    assert provenance.config_sha256(build_config(data, ["loss.k=2"])) != base


def test_code_version_reads_the_checkout_and_is_none_outside_one(tmp_path):
    here = provenance.code_version()
    head = subprocess.run(["git", "-C", str(provenance.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert here["commit"] == head.stdout.strip() and isinstance(here["dirty"], bool)
    assert provenance.code_version(tmp_path) == {"commit": None, "dirty": None}
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("1")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    clean = provenance.code_version(repo)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (repo / "f").write_text("2")
    assert provenance.code_version(repo) == {"commit": clean["commit"], "dirty": True}


def test_portable_paths_name_the_repository_cache_and_home_never_the_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(tmp_path / "cache"))
    assert provenance.portable_path(provenance.ROOT / "runs" / "x") == "runs/x"
    assert provenance.portable_path(tmp_path / "cache" / "zoo" / "v1") == "$OPD_AGENTS_CACHE/zoo/v1"
    assert provenance.portable_path(Path.home() / "data" / "set") == "~/data/set"
    assert provenance.portable_path(tmp_path / "a" / "b" / "c") == ".../b/c"
