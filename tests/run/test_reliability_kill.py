"""kill -9 of the training process (between steps, and in the middle of a checkpoint write), then `--resume`:
no half checkpoint is picked up, metrics.jsonl has no torn line and no duplicated step, and the resumed run ends
with the same weights as an uninterrupted run. Real stack: CLI subprocesses, Ray local cluster, math env, tiny models.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.run.test_train_e2e import tiny_run_data

ROOT = Path(__file__).parents[2]
STEPS = 3

# Runs the real CLI, but SIGKILLs its own process group (driver + Ray) at the first fsync of checkpoint
# number KILL_AT_SAVE: the checkpoint's temp folder is fully written, not yet renamed into place.
KILL_IN_CHECKPOINT = """
import os, signal, sys
import opd_agents.run.checkpoint as ckpt
calls = {"n": 0}
original = ckpt._fsync_tree
def fsync_then_die(root):
    if root.name.startswith(".step_"):
        calls["n"] += 1
        if calls["n"] == int(os.environ["KILL_AT_SAVE"]):
            os.killpg(0, signal.SIGKILL)
    original(root)
ckpt._fsync_tree = fsync_then_die
from opd_agents.train import main
sys.exit(main(sys.argv[1:]))
"""


def _config(tmp_path: Path, dirs: dict[str, Path], name: str) -> Path:
    data = tiny_run_data(tmp_path / "runs", dirs, name, STEPS)
    data["run"] |= {"keep_last": 5, "seed": 11, "eval_before": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(args: list[str], env: dict[str, str] | None = None, script: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "opd_agents.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # raises on a torn line


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{STEPS}" / "model.safetensors")


def _assert_same_final_state(reference: Path, resumed: Path) -> None:
    ref, got = _weights(reference), _weights(resumed)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in _metrics(resumed) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert not [p for p in (resumed / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dirs) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    code, out = _finish(_run([str(_config(tmp, tiny_model_dirs, "ref"))]))
    assert code == 0, out
    # Quiet logs: the driver's own model load may show transformers' bar, the Ray workers' loads do not.
    assert out.count("Loading weights") <= 1 and "Ray deduplicates logs" not in out, out
    assert "Writing model shards" not in out, out  # checkpoint saves are routine: no bar
    return tmp / "runs" / "ref"


@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume(tmp_path, tiny_model_dirs, reference_run):
    cfg = _config(tmp_path, tiny_model_dirs, "ckpt")
    code, out = _finish(_run([str(cfg)], env={"KILL_AT_SAVE": "2"}, script=KILL_IN_CHECKPOINT))
    assert code == -signal.SIGKILL, out
    run = tmp_path / "runs" / "ckpt"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [".step_2.tmp", "step_1"]  # the half-written one exists but is not complete
    code, out = _finish(_run([str(cfg), "--resume"]))
    assert code == 0, out
    _assert_same_final_state(reference_run, run)


@pytest.mark.slow
def test_kill_between_steps_then_resume(tmp_path, tiny_model_dirs, reference_run):
    cfg = _config(tmp_path, tiny_model_dirs, "steps")
    run = tmp_path / "runs" / "steps"
    proc = _run([str(cfg)])
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step_1").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    _kill_group(proc)
    code, out = _finish(_run([str(cfg), "--resume"]))
    assert code == 0, out
    _assert_same_final_state(reference_run, run)
