"""Training steps of the real trainer at the real vocabulary size (V ≈ 152k) on CPU: seconds per step, peak memory.

Student: a random-init tiny Qwen2 (hidden 64, 2 layers, head_dim 32, tied embeddings) with the real Qwen2.5-Instruct
tokenizer (V = 151,665); teacher: a tiny Qwen3 of the same size with the real Qwen3 tokenizer (V = 151,669),
`vocab_mismatch: map`, re-rendering every sample with Qwen3's chat template in non-thinking mode. The tokenizers are
read from ../shared/tokenizers (or $OPD_AGENTS_TOKENIZERS), the data from ../shared/data: math on MATH-500 (one
answer), ALFWorld on the official valid_seen games with the paper's per-turn prompt (no planner expert).
Each case is one `python -m opd_agents.train CONFIG` process (Ray local cluster, 1 rollout worker, 2 CPUs; 4 episodes
per step, K = 32) running STEPS steps of one task; seconds per step are the trainer's own `time/step` records (median
over the steps after the first, which warms caches, and the first separately), with its rollout / teacher / learner
split. Peak memory: the summed resident memory of the trainer process and all its descendants (the Ray raylet and
the rollout worker), sampled every 0.2 s, and the trainer process's own peak (`ru_maxrss`: learner + teacher).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from _common import ROOT, main, print_table, save

SHARED = ROOT.parent / "shared"
TOKENIZERS = Path(os.environ.get("OPD_AGENTS_TOKENIZERS", SHARED / "tokenizers"))
NO_THINKING = "{%- set enable_thinking = false %}"
STEPS, QUICK_STEPS = 4, 2


def tiny_model(tokenizer_dir: Path, out: Path, arch: str, seed: int) -> Path:
    """A random-init hidden-64, 2-layer model with the tokenizer's vocabulary, saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def task(name: str) -> dict[str, Any]:
    if name == "math":
        return {"name": "math", "env_id": "opd/Math-v0", "teacher": "qwen3", "max_new_tokens": 64, "eval_episodes": 1,
                "env_kwargs": {"data_path": str(SHARED / "data" / "math" / "math500_test.jsonl"),
                               "data_format": "math500", "split": "all"}}
    return {"name": "alfworld", "env_id": "opd/ALFWorld-v0", "teacher": "qwen3", "max_new_tokens": 32,
            "max_turns": 5, "sample_mode": "per_turn", "eval_episodes": 1,
            "env_kwargs": {"data_path": str(SHARED / "data" / "alfworld"), "split": "valid_seen", "expert": None}}


def run_config(out: Path, student: Path, teacher: Path, task_name: str, steps: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    template = NO_THINKING + AutoTokenizer.from_pretrained(teacher).chat_template
    return {
        "run": {"name": task_name, "output_dir": str(out), "steps": steps, "device": "cpu", "seed": 0,
                "eval_every": 0, "save_every": 0},
        "student": {"path": str(student)},
        "rollout": {"num_workers": 1, "prompts_per_step": 2, "group_size": 2, "max_concurrent_episodes": 4},
        "teachers": {"qwen3": {"model": str(teacher), "vocab_mismatch": "map", "chat_template": template}},
        "tasks": [task(task_name)],
        "loss": {"k": 32},
        "eval": {"teacher_reference": False},
        "logging": {"tensorboard": False, "progress": False},
        "ray": {"num_cpus": 2},
    }


def tree_rss_mib(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / (1 << 20)


def train(config: Path) -> dict[str, Any]:
    """One `python -m opd_agents.train` process (reaped, so its ru_maxrss is in RUSAGE_CHILDREN); its wall time and
    the peak summed RSS of it and its descendants."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "opd_agents.train", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak, done = psutil.Process(proc.pid), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_rss_mib(watched))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"training failed (exit {proc.returncode}): {err[-2000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_tree_rss_mib": peak[0]}


def benchmark(args: argparse.Namespace) -> None:
    import resource

    steps = QUICK_STEPS if args.quick else STEPS
    rows, cases = [], []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        student = tiny_model(TOKENIZERS / "qwen2.5-instruct", tmp / "student", "qwen2", seed=0)
        teacher = tiny_model(TOKENIZERS / "qwen3", tmp / "teacher", "qwen3", seed=1)
        for name in ("math", "alfworld"):
            config = tmp / f"{name}.yaml"
            config.write_text(yaml.safe_dump(run_config(tmp / "runs", student, teacher, name, steps)))
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            result = train(config)
            after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            records = [json.loads(line) for line in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            records = [r for r in records if "time/step" in r]
            later = records[1:] or records
            case = {"task": name, "steps": len(records), "vocab_student": 151_665, "vocab_teacher": 151_669,
                    "first_step_s": records[0]["time/step"],
                    "step_s_median": statistics.median(r["time/step"] for r in later),
                    **{f"{part}_s_median": statistics.median(r[f"time/{part}"] for r in later)
                       for part in ("rollout", "teacher", "learner", "sync")},
                    "loss": [r["train/loss"] for r in records],
                    "loss_tokens_per_step": statistics.median(r.get("train/tokens", 0) for r in records),
                    "peak_tree_rss_mib": result["peak_tree_rss_mib"],
                    # RUSAGE_CHILDREN's maximum grows only when this child beats the earlier ones.
                    "trainer_peak_rss_mib": after / 1024 if after > before else None,
                    "process_wall_s": result["wall_s"]}
            cases.append(case)
            rows.append([name, case["steps"], case["first_step_s"], case["step_s_median"], case["rollout_s_median"],
                         case["teacher_s_median"], case["learner_s_median"], case["loss_tokens_per_step"],
                         case["peak_tree_rss_mib"], case["trainer_peak_rss_mib"] or "-", case["process_wall_s"]])
    print_table(f"real trainer at V ≈ 152k, CPU ({steps} steps per task)",
                ["task", "steps", "first step s", "step s (median)", "rollout s", "teacher s", "learner s",
                 "loss tokens/step", "peak RSS all MiB", "trainer RSS MiB", "process s"], rows)
    save("real_vocab_steps_quick" if args.quick else "real_vocab_steps", {"steps": steps, "cases": cases})


if __name__ == "__main__":
    main(__doc__, benchmark)
