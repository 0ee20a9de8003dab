"""Training at the real vocabulary size (V ≈ 152k) with the real Qwen2.5-Instruct / Qwen3 tokenizers, on CPU.

The canary: a student distilled from itself — the same weights as teacher, re-rendered through the teacher-template
path with the student's own template — has loss 0 (to float tolerance) on every task (math on MATH-500, ALFWorld on
the official games with the paper's prompt) and every sample mode (conversation, per_turn). Any offset, template or
masking bug between rollout, teacher and learner shows up as a positive loss. One form runs the pieces in process
(rollout worker, hf teacher, learner); the others run the real trainer (Ray, `python -m opd_agents.train`)
— the canary, and two steps of a Qwen2.5 student with a Qwen3 teacher (`vocab_mismatch: map`).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from transformers import AutoTokenizer

from opd_agents.config import build_config
from opd_agents.learner.learner import Learner
from opd_agents.rollout import LocalRolloutGroup
from opd_agents.run.metrics import read_metrics
from opd_agents.train import main as train_main
from teachers.hf import HFTeacher
from tests.real_vocab import (
    ALFWORLD_DATA,
    MATH_DATA,
    QWEN3,
    QWEN25,
    needs_official_data,
    needs_real_tokenizers,
    save_tiny_model,
)

pytestmark = [needs_real_tokenizers, needs_official_data]

TOLERANCE = 1e-5  # nats per token: float noise between the teacher's and the learner's forward passes
MATH500 = {"data_path": str(MATH_DATA / "math500_test.jsonl"), "data_format": "math500", "split": "all"}
ALFWORLD = {"data_path": str(ALFWORLD_DATA), "split": "valid_seen", "expert": None}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_vocab_models")
    return {"qwen2.5": save_tiny_model(QWEN25, root / "qwen2.5", "qwen2", seed=0),
            "qwen3": save_tiny_model(QWEN3, root / "qwen3", "qwen3", seed=1)}


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def tasks(modes: tuple[str, ...] = ("conversation", "per_turn")) -> list[dict]:
    """Math (two attempts: a multi-turn conversation when the first answer is wrong) and ALFWorld (3 turns), in each
    sample mode; all on the real data."""
    out = []
    for mode in modes:
        suffix = "" if mode == "conversation" else "_per_turn"
        out += [{"name": f"math{suffix}", "env_id": "opd/Math-v0", "teacher": "t", "max_new_tokens": 12,
                 "max_turns": 2, "sample_mode": mode, "eval_episodes": 1, "env_kwargs": {**MATH500, "max_attempts": 2}},
                {"name": f"alfworld{suffix}", "env_id": "opd/ALFWorld-v0", "teacher": "t", "max_new_tokens": 12,
                 "max_turns": 3, "sample_mode": mode, "eval_episodes": 1, "env_kwargs": ALFWORLD}]
    return out


def run_data(out: Path, student: Path, teacher: Path, task_list: list[dict], steps: int, **teacher_extra) -> dict:
    return {
        "run": {"name": "real-vocab", "output_dir": str(out), "steps": steps, "device": "cpu", "seed": 0,
                "eval_every": 0, "save_every": 0},
        "student": {"path": str(student)},
        "rollout": {"num_workers": 1, "prompts_per_step": 1, "group_size": 2, "max_concurrent_episodes": 2},
        "teachers": {"t": {"model": str(teacher), **teacher_extra}},
        "tasks": task_list,
        "schedule": {"kind": "alternating"},
        "loss": {"k": 32},
        "eval": {"teacher_reference": False},
        "logging": {"tensorboard": False, "progress": False},
        "ray": {"num_cpus": 2},
    }


def canary_data(out: Path, folder: Path, steps: int) -> dict:
    """The student as its own teacher, re-rendered with the student's own chat template (the re-rendering path must
    reproduce the student's ids), at a learning rate so small that the weights stay the teacher's across steps."""
    data = run_data(out, folder, folder, tasks(), steps,
                    chat_template=AutoTokenizer.from_pretrained(folder).chat_template)
    return data | {"optim": {"lr": 1e-12, "grad_clip": 1.0}}


@pytest.mark.slow  # ~30 s per student on 2 cores: the fast suite's budget is spent by tests/teachers
@pytest.mark.parametrize("student", ["qwen2.5", "qwen3"])
def test_self_distillation_canary_in_process(model_dirs, tmp_path, student):
    cfg = build_config(canary_data(tmp_path, model_dirs[student], 1))
    group = LocalRolloutGroup(cfg.student, cfg.rollout, seed=0)
    teacher = HFTeacher("t", cfg.teachers["t"])
    learner = Learner(cfg, cfg.student.path)
    try:
        for i, task in enumerate(cfg.tasks):
            samples = group.rollout(task, seed=i).samples
            assert samples and all(s.num_loss_tokens for s in samples)
            loss = learner.update(samples, teacher.topk(samples, cfg.loss.k))["loss"]
            assert abs(loss) < TOLERANCE, (task.name, loss)
    finally:
        group.shutdown()
        teacher.close()


@pytest.mark.slow
def test_self_distillation_canary_through_the_trainer(model_dirs, tmp_path):
    data = canary_data(tmp_path, model_dirs["qwen2.5"], len(tasks()))  # alternating: one step per task
    path = tmp_path / "canary.yaml"
    path.write_text(yaml.safe_dump(data))
    assert train_main([str(path)]) == 0
    records = [r for r in read_metrics(tmp_path / "real-vocab" / "metrics.jsonl") if "train/loss" in r]
    losses = {r["task"]: r["train/loss"] for r in records}
    assert set(losses) == {t["name"] for t in data["tasks"]}
    assert all(abs(v) < TOLERANCE for v in losses.values()), losses


@pytest.mark.slow
def test_two_steps_at_real_vocab_qwen25_student_qwen3_teacher(model_dirs, tmp_path):
    """Both tasks, a Qwen3 teacher in non-thinking mode re-rendering Qwen2.5 samples, ids translated by string."""
    template = "{%- set enable_thinking = false %}" + AutoTokenizer.from_pretrained(QWEN3).chat_template
    data = run_data(tmp_path, model_dirs["qwen2.5"], model_dirs["qwen3"], tasks(("per_turn",)), 2,
                    chat_template=template, vocab_mismatch="map")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    assert train_main([str(path)]) == 0
    records = [r for r in read_metrics(tmp_path / "real-vocab" / "metrics.jsonl") if "train/loss" in r]
    assert [r["task"] for r in records] == ["math_per_turn", "alfworld_per_turn"]
    assert all(r["train/loss"] > 0 and r["time/step"] > 0 for r in records)
    assert (tmp_path / "real-vocab" / "checkpoints" / "step_2").is_dir()
