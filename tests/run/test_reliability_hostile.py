"""Hostile inputs and faults at the framework layer: each kind gets a clear `ConfigError`/`CheckpointError` (or a safe
fallback) instead of a traceback, a hang, code execution or a lost checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from opd_agents.config import ConfigError, load_config
from opd_agents.run.checkpoint import CheckpointError, complete_checkpoints, load_latest, save_checkpoint
from opd_agents.run.preflight import preflight
from opd_agents.run.rundir import RunDir
from tests.run.test_reliability_inputs import base_config_data


def _write_config(tmp_path: Path, tiny_model_dirs, **sections) -> Path:
    data = {**base_config_data(tmp_path, tiny_model_dirs), "ray": {"num_cpus": 2}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- values that used to validate and fail late -------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("optim.lr=.inf", "optim.lr"), ("optim.betas=[0.9, .nan]", "optim.betas"), ("optim.betas=[0.9, 1.5]", "betas"),
    ("run.seed=-1", "run.seed"), ("run.seed=18446744073709551616", "run.seed"), ("run.name=../escape", "run.name"),
    ("run.imports=['os; rm -rf /']", "run.imports"), ("loss.clip_eps=.nan", "loss.clip_eps"),
])
def test_bad_values_fail_at_load(tmp_path, tiny_model_dirs, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write_config(tmp_path, tiny_model_dirs), [override])


@pytest.mark.parametrize("text, problem", [
    ("run: {name: a}\nrun: {name: b}\n", "appears twice"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, "
     "*b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n", "alias"),
    ("run: !!python/object/apply:os.system ['true']\n", "could not determine a constructor|tag"),
    ("[" * 10_000, "deep|nest"),
])
def test_hostile_yaml_is_a_config_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_non_utf8_config_and_broken_override_are_config_errors(tmp_path, tiny_model_dirs) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match="loss.k"):
        load_config(_write_config(tmp_path, tiny_model_dirs), ["loss.k=[1,"])


def test_cli_prints_one_error_line_for_a_yaml_error(tmp_path, tiny_model_dirs) -> None:
    cfg = _write_config(tmp_path, tiny_model_dirs)
    result = subprocess.run([sys.executable, "-m", "opd_agents.train", str(cfg), "optim.lr={"],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2 and "Traceback" not in result.stderr and "error:" in result.stderr
    assert not (tmp_path / "runs").exists()


# --- preflight: what the config points at --------------------------------------------------------------------------

@pytest.mark.parametrize("sections, problem", [
    ({"rollout": {"num_workers": 512}}, "CPUs"),
    ({"rollout": {"num_gpus_per_worker": 1.0}}, "GPUs"),
    ({"teachers": {"t": {"model": "", "ray_actor": True, "num_gpus": 2}}}, "GPUs"),
    ({"teachers": {"t": {"model": "", "options": {"devcie": "cpu"}}}}, "unknown key 'devcie'"),
    ({"teachers": {"t": {"model": "", "options": {"device": 3}}}}, "options.device must be str"),
    ({"teachers": {"t": {"model": "", "ray_actor": True, "options": {"ray_backoff_s": float("inf")}}}},
     "finite positive"),
    ({"teachers": {"t": {"model": "", "ray_actor": True, "options": {"ray_timeout_s": 60}}}},
     "options.ray_timeout_s moved to teachers.t.call_timeout_s"),
    ({"tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t", "max_new_tokens": 100_000,
                 "env_kwargs": {"num_problems": 20}}]}, "context"),
    ({"tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t",
                 "env_kwargs": {"num_problems": 20, "grading_timeout": float("inf")}}]}, "grading_timeout"),
])
def test_preflight_refuses_what_would_hang_or_fail_late(tmp_path, tiny_model_dirs, sections, problem) -> None:
    if "teachers" in sections:
        sections["teachers"]["t"]["model"] = str(tiny_model_dirs["teacher"])
    if torch.cuda.is_available() and problem == "GPUs":
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=problem):
        preflight(load_config(_write_config(tmp_path, tiny_model_dirs, **sections)))
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_config_error(tmp_path, tiny_model_dirs) -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        preflight(load_config(_write_config(tmp_path, tiny_model_dirs, run={"device": "cuda"})))


@pytest.mark.parametrize("corrupt, problem", [
    (lambda folder: (folder / "config.json").write_text("{not json"), "not a readable JSON"),
    (lambda folder: (folder / "config.json").write_text("[1, 2]"), "JSON object"),
    (lambda folder: (folder / "tokenizer.json").write_text("{}"), "cannot load the tokenizer"),
])
def test_broken_model_folders_are_config_errors(tmp_path, tiny_model_dirs, corrupt, problem) -> None:
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(tiny_model_dirs["student"], folder)
    corrupt(folder)
    with pytest.raises(ConfigError, match=problem):
        preflight(load_config(_write_config(tmp_path, tiny_model_dirs, student={"path": str(folder)})))


def test_a_module_failing_at_import_is_a_config_error(tmp_path, tiny_model_dirs, monkeypatch) -> None:
    (tmp_path / "exploding_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs, run={"imports": ["exploding_plugin"]}))
    with pytest.raises(ConfigError, match="RuntimeError: boom at import"):
        preflight(cfg)


# --- checkpoints: resume trusts nothing ----------------------------------------------------------------------------

def _save(ckpt_dir: Path, step: int, keep_last: int = 3) -> Path:
    def save_model(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(os.urandom(64))

    return save_checkpoint(ckpt_dir, step, save_model, {"step": step, "weights": torch.ones(3) * step}, keep_last)


@pytest.mark.parametrize("damage", ["truncate_state", "modify_weights", "delete_state", "garble_manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    newest = _save(ckpt, 2)
    state = newest / "trainer_state.pt"
    if damage == "truncate_state":
        state.write_bytes(state.read_bytes()[:20])
    elif damage == "modify_weights":
        (newest / "model.safetensors").write_bytes(b"x" * 64)
    elif damage == "delete_state":
        state.unlink()
    else:
        (newest / "COMPLETE").write_text("{")
    with pytest.warns(UserWarning, match="skipping checkpoint step_2"):
        folder, loaded = load_latest(ckpt)
    assert folder.name == "step_1" and loaded["step"] == 1 and torch.equal(loaded["weights"], torch.ones(3))


def test_no_verifiable_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    (_save(ckpt, 1) / "trainer_state.pt").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no checkpoint .* passes verification"):
            load_latest(ckpt)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_payload_with_a_matching_manifest_is_never_executed(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    forged = _save(ckpt, 2)
    torch.save({"step": 2, "evil": _Payload()}, forged / "trainer_state.pt")
    manifest = json.loads((forged / "COMPLETE").read_text())
    manifest["sha256"]["trainer_state.pt"] = hashlib.sha256((forged / "trainer_state.pt").read_bytes()).hexdigest()
    (forged / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="cannot be loaded safely"):
        folder, _ = load_latest(ckpt)
    assert folder.name == "step_1" and not (tmp_path / "pwned").exists()


def test_resave_of_a_step_killed_between_renames_keeps_a_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    # The state a kill leaves after the old step_1 was renamed aside and before the new one landed.
    os.replace(ckpt / "step_1", ckpt / ".step_1.replaced")
    (ckpt / ".step_1.tmp").mkdir()
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_1"]
    assert load_latest(ckpt)[1]["step"] == 1 and not (ckpt / ".step_1.tmp").exists()


def test_pruning_never_leaves_a_marked_partial_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    for step in range(1, 5):
        _save(ckpt, step, keep_last=2)
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_3", "step_4"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_3", "step_4"]


# --- the run directory: one owner, and a resume keeps the run's config ---------------------------------------------

def test_two_processes_cannot_hold_one_run_dir(tmp_path, tiny_model_dirs) -> None:
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs))
    first = RunDir.for_config(cfg)
    first.create(cfg, resume=False)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(first.root / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        first.release()  # this process lets go; the other one takes it
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="is in use by"):
            RunDir.for_config(cfg).create(cfg, resume=True)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_resume_refuses_a_different_config_and_keeps_the_old_one_for_allowed_changes(tmp_path, tiny_model_dirs):
    path = _write_config(tmp_path, tiny_model_dirs)
    cfg = load_config(path)
    run = RunDir.for_config(cfg)
    run.create(cfg, resume=False)
    (run.root / "metrics.jsonl").write_text('{"step": 1}\n')
    saved = run.config_path.read_text()
    run.release()
    with pytest.raises(ConfigError, match=r"differs .* \['loss.k'\]"):
        RunDir.for_config(cfg).create(load_config(path, ["loss.k=4"]), resume=True)
    assert run.config_path.read_text() == saved
    longer = load_config(path, ["run.steps=5"])
    RunDir.for_config(longer).create(longer, resume=True)
    assert (run.root / "config.before-resume-1.yaml").read_text() == saved
    assert "steps: 5" in run.config_path.read_text()


def test_a_run_started_before_a_field_existed_resumes_at_its_default_not_past_it(tmp_path, tiny_model_dirs):
    """A saved config.yaml without fields added to the schema since (here the run.pipeline ones): resuming with them
    at their defaults is no change; setting one is, unless it is a key a resume may change."""
    path = _write_config(tmp_path, tiny_model_dirs)
    cfg = load_config(path)
    run = RunDir.for_config(cfg)
    run.create(cfg, resume=False)
    run.release()
    old = "\n".join(line for line in run.config_path.read_text().splitlines()
                    if not line.strip().startswith(("pipeline:", "max_staleness:", "pipeline_timeout_s:")))
    run.config_path.write_text(old + "\n")
    assert RunDir.for_config(cfg).check(resume=True) is not None  # the defaults: resumes
    with pytest.raises(ConfigError, match=r"differs .* \['run.pipeline'\]"):
        RunDir.for_config(cfg).create(load_config(path, ["run.pipeline=async"]), resume=True)
    waits = load_config(path, ["run.pipeline_timeout_s=60"])
    RunDir.for_config(waits).create(waits, resume=True)


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path, tiny_model_dirs) -> None:
    (tmp_path / "runs").write_text("not a folder")
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs))
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        RunDir.for_config(cfg).create(cfg, resume=False)


def test_credentials_are_redacted_and_only_credentials() -> None:
    from opd_agents.config import REDACTED, redact, short_repr

    options = {"hf_token": "hf_abc", "openai_api_key": "sk-1", "password": "p", "nested": [{"auth": "x"}],
               "max_new_tokens": 7, "token_budget": 9, "special_tokens": ["<a>"], "micro_batch_tokens": 5}
    clean = redact(options)
    assert clean["hf_token"] == clean["openai_api_key"] == clean["password"] == clean["nested"][0]["auth"] == REDACTED
    assert {k: clean[k] for k in ("max_new_tokens", "token_budget", "special_tokens", "micro_batch_tokens")} == {
        "max_new_tokens": 7, "token_budget": 9, "special_tokens": ["<a>"], "micro_batch_tokens": 5}
    assert "hf_abc" not in short_repr(options) and "sk-1" not in short_repr(options)


def test_a_token_in_teacher_options_never_reaches_config_yaml(tmp_path, tiny_model_dirs) -> None:
    from opd_agents.config import dump_config

    cfg = load_config(_write_config(tmp_path, tiny_model_dirs))
    cfg = cfg.model_copy(update={"teachers": {"t": cfg.teachers["t"].model_copy(
        update={"options": {"hf_token": "hf_secret_value"}})}})
    assert "hf_secret_value" not in dump_config(cfg)


def test_a_step_whose_rollouts_yield_no_sample_names_the_end_reasons(tmp_path, tiny_model_dirs) -> None:
    # Every prompt overflows the tiny student's 2,048-token context: the episodes end before generating anything.
    from opd_agents.config import build_config
    from opd_agents.run.rundir import RunDir
    from opd_agents.run.trainer import Trainer
    from tests.run.test_train_e2e import tiny_run_data

    data = tiny_run_data(tmp_path, tiny_model_dirs, "overflow", 1)
    data["tasks"][0]["env_kwargs"]["system_prompt"] = "Think. " * 3000
    cfg = build_config(data, [])
    run_dir = RunDir.for_config(cfg)
    run_dir.create(cfg, resume=False)
    trainer = Trainer(cfg, run_dir)
    try:
        with pytest.raises(RuntimeError, match=r"produced no sample to train on.*'context_overflow'"):
            trainer.fit()
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
