"""benchmarks/gpu_check.py: its CPU smoke run passes every check with Ray (and the other packages the GPU machine
lacks) unimportable, and its plumbing records an out-of-memory case and a crashing check instead of dying."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-instruct"
# Not on the GPU machine (and not installable there); nothing the check imports may need them.
UNIMPORTABLE = ("ray", "vllm", "gymnasium", "alfworld", "math_verify")


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their siblings by name
    return importlib.import_module("gpu_check")


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreters cannot import UNIMPORTABLE (a sitecustomize sets them to None)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {UNIMPORTABLE!r}:\n    sys.modules[name] = None\n")
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@pytest.mark.skipif(not TOKENIZER.is_dir(), reason=f"the real Qwen2.5 tokenizer is not at {TOKENIZER}")
def test_small_run_passes_without_ray(tmp_path: Path, gpu_check: ModuleType) -> None:
    env = blocked_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "import of ray halted" in probe.stderr  # the block works
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--tokenizer", str(TOKENIZER),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["small"] and set(result["checks"]) == {"build", *gpu_check.CHECKS}
    checks = result["checks"]
    assert all("tolerance" in checks[name] for name in gpu_check.CHECKS)
    assert checks["teacher"]["outputs_fp32_int64_cpu"] and checks["teacher"]["dtype"] == "torch.bfloat16"
    assert checks["learner"]["device"]["dtype"] == "torch.bfloat16" and checks["learner"]["cpu_fp32"]["loss"] > 0
    assert checks["learner"]["device"]["master_dtype"] == "torch.float32"
    assert len(checks["memory"]["cases"]) == 2 * len(gpu_check.SMALL.memory_T)  # with and without checkpointing
    precision = checks["precision"]
    assert precision["fp32_master"]["norm_gains_changed"] == 1.0 and precision["pure_bf16"]["norm_gains_changed"] == 0
    assert checks["collectives"]["backend"] == "gloo" and checks["collectives"]["weights_dtype"] == "torch.bfloat16"
    assert checks["policy"]["tokens"] > 0 and checks["policy"]["same_seed_reproducible"]
    cases = checks["loss_path"]["cases"]
    assert len(cases) == 2 * 2 * len(gpu_check.SMALL.loss_T) and all("error" not in c for c in cases)


def test_out_of_memory_case_is_recorded(gpu_check: ModuleType) -> None:
    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.29 GiB")

    def broken() -> dict:
        raise RuntimeError("Expected all tensors to be on the same device")

    assert gpu_check.run_case(oom, torch.device("cpu")) == {"error": "out of memory"}
    with pytest.raises(RuntimeError, match="same device"):
        gpu_check.run_case(broken, torch.device("cpu"))


def test_a_crashing_check_fails_the_run_and_the_rest_still_run(tmp_path: Path, gpu_check: ModuleType) -> None:
    report = gpu_check.Report(tmp_path / "r.json", {"benchmark": "gpu_check"})
    assert report.run("broken", lambda: 1 / 0) is None
    assert report.run("fine", lambda: ({"passed": True}, 7)) == 7
    result = json.loads((tmp_path / "r.json").read_text())
    assert not report.passed and result["passed"] is False and result["checks"]["fine"]["passed"]
    assert result["checks"]["broken"]["error"].startswith("ZeroDivisionError")
