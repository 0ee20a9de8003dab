"""Config schema, overrides, cross-reference checks, and the error message of each failure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest
import yaml

from opd_agents.config import ConfigError, build_config, dump_config, load_config, parse_override
from opd_agents.run.preflight import check_references

BASE = {
    "run": {"name": "t", "steps": 3},
    "student": {"path": "zoo:student"},
    "teachers": {"tm": {"backend": "hf", "model": "zoo:teacher"}},
    "tasks": [
        {"name": "math", "env_id": "opd/TestEcho-v0", "teacher": "tm"},
        {"name": "other", "env_id": "opd/TestEcho-v0", "teacher": "tm", "max_turns": 3},
    ],
}


class _EchoEnv(gymnasium.Env):
    observation_space = gymnasium.spaces.Text(10)
    action_space = gymnasium.spaces.Text(10)


if "opd/TestEcho-v0" not in gymnasium.registry:
    gymnasium.register(id="opd/TestEcho-v0", entry_point=_EchoEnv)


def _data() -> dict:
    return yaml.safe_load(yaml.safe_dump(BASE))


def _error(data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        check_references(build_config(data, overrides))
    return str(info.value)


def test_defaults_and_roundtrip(tmp_path: Path) -> None:
    cfg = build_config(_data())
    assert cfg.loss.name == "topk_reverse_kl" and cfg.loss.k == 32 and cfg.rollout.top_p == 0.9
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_overrides_parse_yaml_values_and_address_tasks_by_name_or_index() -> None:
    cfg = build_config(_data(), ["loss.k=64", "run.steps=10", "tasks.other.max_turns=7", "tasks.0.max_new_tokens=9",
                                 "loss.renormalize=false", "loss.special_tokens=[<think>, '</think>']",
                                 "optim.lr=1e-4"])
    assert cfg.loss.k == 64 and cfg.run.steps == 10 and cfg.task("other").max_turns == 7
    assert cfg.task("math").max_new_tokens == 9 and cfg.loss.renormalize is False
    assert cfg.loss.special_tokens == ["<think>", "</think>"] and cfg.optim.lr == 1e-4


def test_unknown_key_names_key_suggestion_and_valid_keys() -> None:
    msg = _error(_data(), ["loss.topk=8"])
    assert "loss.topk" in msg and "'k'" in msg and "renormalize" in msg
    data = _data()
    data["tasks"][0]["max_turn"] = 2
    msg = _error(data)
    assert "tasks.0.max_turn" in msg and "Did you mean 'max_turns'" in msg and "sample_mode" in msg
    data = _data()
    data["rollut"] = {}
    msg = _error(data)
    assert "'rollut'" in msg and "rollout" in msg


def test_wrong_type_and_bad_choice_name_the_key() -> None:
    msg = _error(_data(), ["loss.k=many"])
    assert "loss.k" in msg and "many" in msg
    msg = _error(_data(), ["loss.name=forward_kl"])
    assert "loss.name" in msg and "topk_reverse_kl" in msg and "sampled_token_opd" in msg
    msg = _error(_data(), ["rollout.top_p=1.5"])
    assert "rollout.top_p" in msg


def test_missing_teacher_lists_defined_teachers() -> None:
    msg = _error(_data(), ["tasks.math.teacher=nobody"])
    assert "nobody" in msg and "['tm']" in msg


def test_lr_scale_needs_one_task_per_step() -> None:
    msg = _error(_data(), ["tasks.other.lr_scale=5", "schedule.kind=mixed"])
    assert "['other']" in msg and "alternating" in msg
    assert build_config(_data(), ["tasks.other.lr_scale=5"]).task("other").lr_scale == 5.0


def test_unregistered_env_lists_registered_ids() -> None:
    msg = _error(_data(), ["tasks.math.env_id=opd/Nope-v0"])
    assert "opd/Nope-v0" in msg and "opd/TestEcho-v0" in msg and "run.imports" in msg


def test_unknown_teacher_backend_lists_backends() -> None:
    msg = _error(_data(), ["teachers.tm.backend=magic"])
    assert "teachers.tm.backend" in msg and "magic" in msg and "registered backends" in msg


def test_duplicate_task_names_and_missing_required() -> None:
    data = _data()
    data["tasks"][1]["name"] = "math"
    assert "repeated" in _error(data)
    data = _data()
    del data["student"]
    assert "missing required key 'student'" in _error(data)


def test_bad_override_syntax_and_missing_list_item() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("loss.k")
    msg = _error(_data(), ["tasks.nope.max_turns=2"])
    assert "tasks.nope" in msg and "math" in msg


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def _cli_data(tmp_path: Path, dirs: dict[str, Path]) -> dict:
    data = _data()
    data["student"]["path"] = str(dirs["student"])
    data["teachers"]["tm"]["model"] = str(dirs["teacher"])
    return data


def test_cli_misspelt_key_exits_nonzero_and_writes_nothing(tmp_path: Path, tiny_model_dirs) -> None:
    data = _cli_data(tmp_path, tiny_model_dirs)
    data["run"]["output_dir"] = str(tmp_path / "runs")
    data["run"]["imports"] = ["tests.config.test_config"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "opd_agents.train", str(path), "optim.learning_rate=1"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2
    assert "optim.learning_rate" in proc.stderr and "'lr'" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_steps_zero_writes_run_dir_and_refuses_to_overwrite(tmp_path: Path, tiny_model_dirs) -> None:
    data = _cli_data(tmp_path, tiny_model_dirs)
    data["run"]["output_dir"] = str(tmp_path / "runs")
    data["run"]["imports"] = ["tests.config.test_config"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "opd_agents.train", str(path), "run.steps=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((tmp_path / "runs" / "t" / "config.yaml").read_text())
    assert saved["run"]["steps"] == 0 and saved["loss"]["k"] == 32
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.parametrize("entry, flags", [("opd_agents.train", ["--resume"]),
                                          ("opd_agents.evaluate", ["--checkpoint", "runs/x/checkpoints/step_1"]),
                                          ("opd_agents.plan", ["--gpus", "8"])])
def test_overrides_may_follow_the_flags(tmp_path: Path, tiny_model_dirs, entry, flags) -> None:
    """`CONFIG --flag key=value` reads key=value as an override (plain argparse said "unrecognized arguments")."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cli_data(tmp_path, tiny_model_dirs)))
    proc = subprocess.run([sys.executable, "-m", entry, str(path), *flags, "optim.learning_rate=1"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert proc.returncode == 2 and "unknown key 'optim.learning_rate'" in proc.stderr, proc.stderr


def test_help_works() -> None:
    for mod in ("opd_agents.train", "opd_agents.evaluate"):
        proc = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "section.key=value" in proc.stdout


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/**/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.tasks and all(t.teacher in cfg.teachers for t in cfg.tasks)


def test_every_config_field_has_help_text() -> None:
    from pydantic import BaseModel

    from opd_agents.config import Config

    def missing(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                out.append(prefix + name)
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    out += missing(arg, f"{prefix}{name}.")
        return out

    assert missing(Config) == []
    assert len(Config.model_fields) >= 12
