"""GPU readiness: the project's CUDA paths run, agree with fp32 references and are timed, in one command, without Ray.

Checks, in order (each passes or fails against the tolerance it records; the script exits 1 if any fails):
  build      random-init Qwen2 models on the real Qwen2.5 tokenizer (`--tokenizer`): a Qwen2.5-0.5B-shaped student
             and a Qwen2.5-1.5B-shaped teacher (V = 151,936), with untied random LM heads whose logits have std
             LOGIT_STD (the default init gives near-uniform next-token distributions, where every top-K is a tie).
  policy     `HFPolicy` top-p generation on the device (left-padded prompts of different lengths, pinned seed);
             behaviour log-probs against a recomputation: one unpadded forward per sequence, `processed_logprobs`.
  teacher    the `hf` teacher's top-K on the device (dtype auto = bf16 on CUDA) against a full-softmax fp32 reference
             of the same weights: the outputs' dtypes, top-K id sets equal except near-ties, log-prob error.
  learner    one `Learner.update` (topk_reverse_kl, K = 32) on the device (bf16 compute over fp32 master weights) and in
             fp32 on the CPU, on the same batch (the student's generations and the teacher's top-K): loss, grad norm.
  loss_path  truncated reverse-KL forward + backward at Qwen2.5-7B's LM head (`loss_path.py`'s V = 152,064; H = 3,584,
             K = 32, T = 4k and 16k, head trained and frozen): the learner's support path vs the naive full-logits
             path, median seconds and `torch.cuda.max_memory_allocated`; an out-of-memory case is recorded, not raised.
  memory     a Qwen2.5-7B-shaped model cut to 2 layers (V = 152,064) in a Learner, T = 2k and 8k, with and without
             activation checkpointing: the bytes a training forward keeps and one update's peak against the memory
             plan (`gpu_memory.py`, `opd_agents/run/memory_plan.py`).
  precision  one AdamW step at lr 1e-6 of that model: float32 masters vs pure bf16 (parameters changed, mean |Δw|).
  collectives  a one-rank process group on the learner's backend (`cpu:gloo,cuda:nccl`) running a DistributedLearner
             (fsdp) update, and what a plain `nccl` group does with a CPU tensor.
The samples flow as in training: the student's generations are the teacher's and the learner's batch (random
responses if generation failed, random top-K if the teacher failed, so one broken check leaves the others running).

Without CUDA (or with `--small`) every check runs at tiny sizes on the CPU in under a minute, the "device" side in
bfloat16, so CI runs every line (tests/benchmarks/test_gpu_check.py, with ray, vllm and gymnasium unimportable, as
on the GPU machine: nothing this script imports may need them). Results: `benchmarks/results/gpu_check.json`
(`gpu_check_small.json`), or `--out`, rewritten after every check so a run cut short still leaves what it measured.

    PYTHONPATH=. python benchmarks/gpu_check.py [--tokenizer DIR] [--small] [--only CHECK ...] [--out JSON]

On a machine without Ray or an installed opd-agents, `PYTHONPATH=.` (the repository root) is what makes the framework
importable; pydantic is the one framework requirement beyond torch, transformers, PyYAML and rich that it needs.

Shapes: N = loss positions of a sample, K = support size, V = vocabulary rows, T = loss-path positions, H = hidden.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gpu_memory
import loss_path
import torch
from _common import RESULTS, ROOT, machine, print_table
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.config import Config, LossConfig, ModelConfig, OptimConfig, RunConfig, TaskConfig, TeacherConfig
from opd_agents.learner.learner import Learner
from opd_agents.samples import Sample, TeacherTopK
from opd_agents.zoo.models import TinySize, build_tiny_model
from teachers.hf import HFTeacher

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-instruct"
CHECKS = ("policy", "teacher", "learner", "loss_path", "memory", "precision", "collectives")
LOGIT_STD = 3.0  # std of the random models' logits: a top-1 probability of a few %, as in a real LM's harder rows
K = 32
TOP_P = 0.9
SEED = 0
GIB = float(1 << 30)

# Tolerances of bf16 on the device against the references. bf16 CPU runs of these checks measured, at 2 layers
# (hidden 64/96) and 8 layers (hidden 256): policy mean |Δ| 0.004/0.019, max 0.066/0.068; teacher mean 0.019/0.028,
# max 0.084/0.139, mismatched ids at most 0.066/0.123 nats below the reference's K-th; learner loss 0.07%/0.46%, grad
# norm 0.10%/0.73%. The error grows with depth, so the bounds leave 3-5x room for 24-28 layers; an indexing or
# normalisation bug is off by whole nats. A bf16 logit near 16 is itself rounded by up to 1/32 (the hf teacher's
# log-softmax runs in fp32 on bf16 logits), which is most of the teacher's mean error.
TOL = {
    "policy": {"logprob_mean_abs": 0.1, "logprob_max_abs": 0.75, "nucleus_flip_fraction": 0.02},
    "teacher": {"logprob_mean_abs": 0.1, "logprob_max_abs": 0.75, "near_tie_nats": 0.5},
    "learner": {"loss_rel": 0.03, "grad_norm_rel": 0.05},
    "loss_path": {"loss_rel_vs_naive": 0.01},
}
PROMPTS = [
    "What is 12 + 35? Put your final answer within \\boxed{}.",
    "Solve for x: 3x + 4 = 19. Show your work, then give the answer within \\boxed{}.",
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, a fridge 1 and "
    "a sinkbasin 1. Your task is to: put a clean apple in fridge.",
    "A train travels 120 km in 1.5 hours and then 80 km in 1 hour. What is its average speed in km/h?",
]


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the device run and the CPU smoke run."""

    student: TinySize
    teacher: TinySize
    vocab: int  # embedding rows of both models (Qwen2.5-0.5B/1.5B pad the tokenizer's 151,665 to this)
    prompts: int
    new_tokens: int
    chunk: int  # teacher and learner rows per chunk
    loss_T: tuple[int, ...]
    loss_H: int
    loss_chunk: int
    repeats: int  # timed loss-path runs per case (after one warm-up)
    cut: TinySize  # the memory and precision checks' model
    memory_T: tuple[int, ...]


FULL = Sizes(student=TinySize(24, 896, 14, 2, 4864, 32768), teacher=TinySize(28, 1536, 12, 2, 8960, 32768),
             vocab=151_936, prompts=8, new_tokens=256, chunk=1024, loss_T=(4096, 16384), loss_H=loss_path.H,
             loss_chunk=loss_path.CHUNK, repeats=3, cut=gpu_memory.cut_7b(2), memory_T=(2048, 8192))
SMALL = Sizes(student=TinySize(2, 64, 4, 2, 128, 2048), teacher=TinySize(2, 96, 4, 2, 192, 2048),
              vocab=151_936, prompts=4, new_tokens=16, chunk=16, loss_T=(64, 256), loss_H=64, loss_chunk=64,
              repeats=1, cut=TinySize(2, 64, 4, 2, 128, 2048), memory_T=(64, 128))


# ---- plumbing ---------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device) -> Iterator[dict[str, float]]:
    """Wall seconds of the block (`s`), the device synchronised on entry and exit."""
    out: dict[str, float] = {}
    sync(device)
    start = time.perf_counter()
    yield out
    sync(device)
    out["s"] = time.perf_counter() - start


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


class Report:
    """Runs checks, records each one's result (an exception is a failed check, not the end of the run) and rewrites
    the JSON after each."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out, self.header, self.checks = out, header, {}
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable[[], tuple[dict[str, Any], Any]]) -> Any:
        print(f"[gpu_check] {name} ...", flush=True)
        start, value = time.perf_counter(), None
        try:
            result, value = fn()
        except Exception as exc:  # a broken check is recorded; the others still run
            result = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(result["traceback"], file=sys.stderr, flush=True)
        self.checks[name] = result | {"seconds": round(time.perf_counter() - start, 2)}
        print(f"[gpu_check] {name}: {'pass' if result['passed'] else 'FAIL'} "
              f"{json.dumps({k: v for k, v in result.items() if k not in ('traceback', 'cases')})}", flush=True)
        self.write()
        return value

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values())

    def write(self) -> None:
        payload = self.header | {"wall_s": round(time.perf_counter() - self.start, 1), "passed": self.passed,
                                 "checks": self.checks}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(self.out)


# ---- models and batch -------------------------------------------------------------------------------------------

def build_model(tokenizer: PreTrainedTokenizerBase, size: TinySize, vocab: int, seed: int) -> PreTrainedModel:
    """A random-init Qwen2 of `size` with `vocab` embedding rows and an untied LM head whose logits have std ≈
    LOGIT_STD (fp32, CPU). Untied: a random tied head scaled up would predict the input token itself (its logit
    grows as H · std², the others as sqrt(H) · std), a degenerate point mass."""
    model = build_tiny_model(tokenizer, size, seed=seed)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.config.tie_word_embeddings = False
    # The final RMSNorm leaves hidden rows of norm ≈ sqrt(H): logit std = weight std · sqrt(H).
    weight = torch.randn(vocab, size.hidden, generator=torch.Generator().manual_seed(seed)) * LOGIT_STD
    model.lm_head.weight = torch.nn.Parameter(weight / size.hidden ** 0.5)
    return model


def build(tokenizer: PreTrainedTokenizerBase, sizes: Sizes, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Student and teacher folders (weights + tokenizer); the fp32 teacher stays in memory as the reference."""
    out: dict[str, Any] = {}
    for name, size, seed in (("student", sizes.student, 1), ("teacher", sizes.teacher, 2)):
        model = build_model(tokenizer, size, sizes.vocab, seed)
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        out[name] = tmp / name
        out[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        if name == "teacher":
            out["teacher_fp32"] = model.eval()
    info = {"student_params": out["student_params"], "teacher_params": out["teacher_params"],
            "student": asdict(sizes.student), "teacher": asdict(sizes.teacher), "vocab": sizes.vocab}
    return {"passed": True, **info}, out


def prompt_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[list[int]]:
    """n chat-templated prompts of different lengths (so the batch is left-padded)."""
    texts = [PROMPTS[i % len(PROMPTS)] + f" (variant {i})" * (i // len(PROMPTS)) for i in range(n)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def make_sample(prompt: list[int], response: list[int], logprobs: list[float]) -> Sample:
    return Sample(input_ids=prompt + response, loss_mask=[0] * len(prompt) + [1] * len(response),
                  behaviour_logprobs=[0.0] * len(prompt) + logprobs, task="gpu_check")


def random_samples(prompts: list[list[int]], sizes: Sizes) -> list[Sample]:
    g = torch.Generator().manual_seed(SEED)
    return [make_sample(p, torch.randint(sizes.vocab, (sizes.new_tokens,), generator=g).tolist(),
                        [0.0] * sizes.new_tokens) for p in prompts]


def random_topk(samples: list[Sample], vocab: int) -> list[TeacherTopK]:
    """Stand-in teacher answers (loss_path's random support inputs), used only when the teacher check failed."""
    g = torch.Generator().manual_seed(SEED)
    outs = []
    for s in samples:
        x = loss_path.support_inputs(s.num_loss_tokens, K, g)
        outs.append(TeacherTopK(x["ids"] % vocab, x["teacher"], x["teacher_sampled"]))
    return outs


# ---- (3) policy -------------------------------------------------------------------------------------------------

def check_policy(student: Path, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], sizes: Sizes,
                 device: torch.device, dtype: str) -> tuple[dict[str, Any], list[Sample]]:
    from opd_agents import sampling
    from opd_agents.rollout import hf_policy  # the package's names load lazily: no Ray, no gymnasium

    policy = hf_policy.HFPolicy.from_pretrained(ModelConfig(path=str(student), dtype=dtype), tokenizer,
                                                device=str(device), seed=SEED)
    params = sampling.SamplingParams(temperature=1.0, top_p=TOP_P, max_new_tokens=sizes.new_tokens, seed=SEED)
    with stopwatch(device) as t:
        gens = policy.generate(prompts, params)
    again = policy.generate(prompts, params)
    diffs, flips, bad = [], 0, 0
    with torch.inference_mode():
        for p, gen in zip(prompts, gens):
            ids = torch.tensor([p + gen.token_ids], device=device)
            logits = policy.model(input_ids=ids).logits[0, len(p) - 1:-1]  # (L, V): row l predicts token l
            recomputed = sampling.processed_logprobs(logits, params).gather(
                -1, torch.tensor(gen.token_ids, device=device)[:, None]).squeeze(-1).cpu()
            behaviour = torch.tensor(gen.logprobs)
            bad += int((~torch.isfinite(behaviour) | (behaviour > 1e-6)).sum())
            inside = torch.isfinite(recomputed)
            flips += int((~inside).sum())
            diffs.append((behaviour - recomputed)[inside].abs())
    diff = torch.cat(diffs)
    tokens = sum(len(g.token_ids) for g in gens)
    tol = TOL["policy"]
    result = {
        "dtype": str(next(policy.model.parameters()).dtype), "tokens": tokens, "generate_s": round(t["s"], 3),
        "tokens_per_s": round(tokens / t["s"], 1), "finish": [g.finish_reason for g in gens],
        "logprob_mean_abs": diff.mean().item(), "logprob_max_abs": diff.max().item(),
        "nucleus_flips": flips, "invalid_behaviour_logprobs": bad,
        "same_seed_reproducible": [g.token_ids for g in gens] == [g.token_ids for g in again], "tolerance": tol}
    result["passed"] = (bad == 0 and result["logprob_mean_abs"] <= tol["logprob_mean_abs"]
                        and result["logprob_max_abs"] <= tol["logprob_max_abs"]
                        and flips <= tol["nucleus_flip_fraction"] * tokens)
    samples = [make_sample(p, g.token_ids, g.logprobs) for p, g in zip(prompts, gens)]
    del policy
    free(device)
    return result, samples


# ---- (2) teacher ------------------------------------------------------------------------------------------------

def check_teacher(teacher_dir: Path, reference: PreTrainedModel, samples: list[Sample], sizes: Sizes,
                  device: torch.device, dtype: str) -> tuple[dict[str, Any], list[TeacherTopK]]:
    cfg = TeacherConfig(model=str(teacher_dir), dtype=dtype, chunk_size=sizes.chunk, options={"device": str(device)})
    teacher = HFTeacher("gpu_check", cfg)
    with stopwatch(device) as t:
        outs = teacher.topk(samples, K)
    teacher_dtype = str(next(teacher.model.parameters()).dtype)
    teacher.close()
    del teacher
    free(device)
    contract = all(o.topk_ids.dtype == torch.int64 and o.topk_logprobs.dtype == torch.float32
                   and o.sampled_logprobs.dtype == torch.float32 and o.topk_ids.device.type == "cpu"
                   and o.topk_ids.shape == (s.num_loss_tokens, K) for s, o in zip(samples, outs))
    reference = reference.to(device)
    errs, sampled_errs, gaps, rows, top1 = [], [], [], 0, 0
    with torch.inference_mode():
        for s, o in zip(samples, outs):
            ids = torch.tensor([s.input_ids], device=device)
            pos = torch.tensor(s.loss_positions(), device=device)
            ref = torch.log_softmax(reference(input_ids=ids).logits[0, pos - 1].float(), -1).cpu()  # (N, V)
            ref_vals, ref_ids = ref.topk(K, dim=-1)
            at_dev = ref.gather(-1, o.topk_ids)  # the reference's log-probs of the device's ids (N, K)
            errs.append((o.topk_logprobs - at_dev).abs().reshape(-1))
            sampled = torch.tensor(s.input_ids)[pos.cpu()]
            sampled_errs.append((o.sampled_logprobs - ref.gather(-1, sampled[:, None]).squeeze(-1)).abs())
            extra = ~(o.topk_ids[..., None] == ref_ids[:, None, :]).any(-1)  # device ids not in the reference top-K
            gaps.append((ref_vals[:, -1:] - at_dev)[extra])  # how far below the reference's K-th each one is
            rows += len(pos)
            top1 += int((o.topk_ids[:, 0] == ref_ids[:, 0]).sum())
    reference.cpu()
    free(device)
    err, sampled_err, gap = torch.cat(errs), torch.cat(sampled_errs), torch.cat(gaps)
    tol = TOL["teacher"]
    result = {
        "dtype": teacher_dtype, "rows": rows, "topk_s": round(t["s"], 3), "outputs_fp32_int64_cpu": contract,
        "logprob_mean_abs": err.mean().item(), "logprob_max_abs": err.max().item(),
        "sampled_logprob_max_abs": sampled_err.max().item(), "top1_agreement": top1 / rows,
        "id_mismatches": gap.numel(), "id_mismatch_fraction": gap.numel() / (rows * K),
        "max_mismatch_gap_nats": gap.max().item() if gap.numel() else 0.0, "tolerance": tol}
    result["passed"] = (contract and result["logprob_mean_abs"] <= tol["logprob_mean_abs"]
                        and max(result["logprob_max_abs"], result["sampled_logprob_max_abs"]) <= tol["logprob_max_abs"]
                        and result["max_mismatch_gap_nats"] <= tol["near_tie_nats"])
    return result, outs


# ---- (4) learner ------------------------------------------------------------------------------------------------

def learner_config(student: Path, teacher: Path, device: str, dtype: str, sizes: Sizes) -> Config:
    return Config(run=RunConfig(device=device, steps=1), student=ModelConfig(path=str(student), dtype=dtype),
                  teachers={"t": TeacherConfig(model=str(teacher))},
                  tasks=[TaskConfig(name="gpu_check", env_id="opd/Math-v0", teacher="t")],
                  loss=LossConfig(k=K, chunk_size=sizes.chunk), optim=OptimConfig(lr=1e-6))


def one_update(cfg: Config, samples: list[Sample], outs: list[TeacherTopK]) -> dict[str, Any]:
    learner = Learner(cfg, cfg.student.path)
    dtype, master = str(learner.compute_dtype), str(next(learner.model.parameters()).dtype)
    if learner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(learner.device)
    with stopwatch(learner.device) as t:
        metrics = learner.update(samples, outs)
    peak = torch.cuda.max_memory_allocated(learner.device) / GIB if learner.device.type == "cuda" else None
    device = learner.device
    del learner
    free(device)
    return {"dtype": dtype, "master_dtype": master, "update_s": round(t["s"], 3), "peak_gib": peak,
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "metrics": metrics}


def check_learner(student: Path, teacher: Path, samples: list[Sample], outs: list[TeacherTopK], sizes: Sizes,
                  device: torch.device, dtype: str) -> tuple[dict[str, Any], None]:
    on_device = one_update(learner_config(student, teacher, device.type, dtype, sizes), samples, outs)
    on_cpu = one_update(learner_config(student, teacher, "cpu", "float32", sizes), samples, outs)
    tol = TOL["learner"]
    result = {"device": on_device, "cpu_fp32": on_cpu, "loss_rel": rel(on_device["loss"], on_cpu["loss"]),
              "grad_norm_rel": rel(on_device["grad_norm"], on_cpu["grad_norm"]), "tolerance": tol}
    result["passed"] = (result["loss_rel"] <= tol["loss_rel"] and result["grad_norm_rel"] <= tol["grad_norm_rel"]
                        and on_device["metrics"]["skipped"] == 0.0)
    return result, None


# ---- (5) loss path ----------------------------------------------------------------------------------------------

def head_inputs(T: int, H: int, device: torch.device, seed: int = SEED) -> dict[str, torch.Tensor]:
    """loss_path's support inputs for T positions plus hidden (T, H) and an LM-head weight (V, H), fp32, on device."""
    with torch.device(device):
        g = torch.Generator(device=device).manual_seed(seed)
        x = loss_path.support_inputs(T, K, g)
        x["weight"] = torch.randn(loss_path.V, H, generator=g).mul_(0.02)
        x["hidden"] = torch.randn(T, H, generator=g)
    return x


def loss_case(path: str, head: str, base: dict[str, torch.Tensor], sizes: Sizes, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    """Median seconds and peak memory of `repeats` forward + backward runs of one path, after one warm-up."""
    x = dict(base, hidden=base["hidden"].to(dtype).requires_grad_(),
             weight=torch.nn.Parameter(base["weight"].to(dtype), requires_grad=head == "trained"))
    params = [t for t in (x["hidden"], x["weight"]) if t.requires_grad]

    def once() -> torch.Tensor:
        for p in params:
            p.grad = None
        with torch.device(device):  # loss_path builds its index and mask tensors without a device argument
            loss = loss_path.lm_head_loss(path, x, sizes.loss_chunk)
        loss.backward()
        return loss

    once()
    for p in params:
        p.grad = None
    free(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / GIB if cuda else None
    times = []
    for _ in range(sizes.repeats):
        with stopwatch(device) as t:
            loss = once()
        times.append(t["s"])
    grad_norm = torch.stack([p.grad.float().norm() for p in params]).norm().item()
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    return {"s": statistics.median(times), "peak_gib": peak, "working_gib": None if peak is None else peak - before,
            "loss": loss.item(), "grad_norm": grad_norm}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def run_case(case: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The case's numbers, or {"error": "out of memory"} (its memory released) when it does not fit."""
    try:
        return case()
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
    free(device)
    return {"error": "out of memory"}


def check_loss_path(sizes: Sizes, device: torch.device) -> tuple[dict[str, Any], None]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the learner's weights there
    cases, agree = [], []
    for T in sizes.loss_T:
        base = head_inputs(T, sizes.loss_H, device)
        for head in ("trained", "frozen"):
            row = {}
            for path in ("framework", "naive"):
                row[path] = run_case(partial(loss_case, path, head, base, sizes, device, dtype), device)
                cases.append({"T": T, "head": head, "path": path} | row[path])
                free(device)
            fw, nv = row["framework"], row["naive"]
            if "error" not in fw and "error" not in nv:
                agree.append(rel(fw["loss"], nv["loss"]))
                cases[-2] |= {"time_x": nv["s"] / fw["s"]} | (
                    {"peak_x": nv["peak_gib"] / fw["peak_gib"]} if fw["peak_gib"] else {})
        del base
        free(device)
    tol = TOL["loss_path"]
    framework_ok = all("error" not in c for c in cases if c["path"] == "framework")
    result = {"V": loss_path.V, "H": sizes.loss_H, "K": K, "dtype": str(dtype), "chunk": sizes.loss_chunk,
              "repeats": sizes.repeats, "cases": cases, "max_loss_rel_vs_naive": max(agree, default=None),
              "tolerance": tol}
    result["passed"] = framework_ok and bool(agree) and max(agree) <= tol["loss_rel_vs_naive"]
    return result, None


# ---- main -------------------------------------------------------------------------------------------------------

def header(device: torch.device, small: bool, sizes: Sizes, tokenizer: Path) -> dict[str, Any]:
    import transformers

    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {"benchmark": "gpu_check", "machine": machine(), "gpu": gpu, "transformers": transformers.__version__,
            "device": str(device), "small": small, "sizes": asdict(sizes), "tokenizer": Path(tokenizer).name,
            "tf32": torch.backends.cuda.matmul.allow_tf32}


def print_summary(report: Report) -> None:
    rows = []
    for name, c in report.checks.items():
        tol = c.get("tolerance", {})
        measured = {k: c.get(k) for k in tol if k in c} or {k: c[k] for k in ("loss_rel", "max_loss_rel_vs_naive")
                                                            if k in c}
        rows.append([name, "pass" if c["passed"] else "FAIL", c["seconds"],
                     c.get("error") or json.dumps(measured, default=lambda v: f"{v:.3g}"), json.dumps(tol)])
    print_table("gpu_check", ["check", "result", "s", "measured / error", "tolerance"], rows)
    lp = report.checks.get("loss_path", {}).get("cases", [])
    if lp:
        print_table("loss path: forward + backward, median seconds, torch.cuda.max_memory_allocated",
                    ["T", "head", "path", "s", "peak GiB", "working GiB", "time ×", "peak ×", "loss"],
                    [[c["T"], c["head"], c["path"], c.get("s", "-"), c.get("peak_gib") or "-",
                      c.get("working_gib") or "-", c.get("time_x", ""), c.get("peak_x", ""),
                      c.get("loss", c.get("error"))] for c in lp])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="the Qwen2.5 tokenizer folder")
    parser.add_argument("--small", action="store_true", help="tiny sizes (automatic without CUDA)")
    parser.add_argument("--device", help="default: cuda when visible, else cpu")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="run only these checks")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/gpu_check[_small].json)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.small or device.type != "cuda"
    sizes = SMALL if small else FULL
    # The device side: the framework's default there (bf16 on CUDA); forced bf16 on CPU, so the comparisons run.
    dtype = "auto" if device.type == "cuda" else "bfloat16"
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer there; for a device run copy "
                     f"../shared/tokenizers/qwen2.5-instruct into the working tree and pass that folder")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are true fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(SEED)
    out = args.out or RESULTS / f"gpu_check{'_small' if small else ''}.json"
    report = Report(out, header(device, small, sizes, args.tokenizer))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if {"policy", "teacher", "learner"} & set(args.only):
            models = report.run("build", lambda: build(tokenizer, sizes, Path(tmp))) or {}
        prompts = prompt_ids(tokenizer, sizes.prompts)
        samples: list[Sample] | None = None
        outs: list[TeacherTopK] | None = None
        if models and "policy" in args.only:
            samples = report.run("policy", lambda: check_policy(models["student"], tokenizer, prompts, sizes,
                                                                device, dtype))
        report.header["samples_from"] = "policy" if samples else "random responses (no policy result)"
        samples = samples or random_samples(prompts, sizes)
        if models and "teacher" in args.only:
            outs = report.run("teacher", lambda: check_teacher(models["teacher"], models["teacher_fp32"], samples,
                                                               sizes, device, dtype))
        report.header["teacher_topk_from"] = "teacher" if outs else "random (no teacher result)"
        outs = outs or random_topk(samples, sizes.vocab)
        models.pop("teacher_fp32", None)
        free(device)
        if models and "learner" in args.only:
            report.run("learner", lambda: check_learner(models["student"], models["teacher"], samples, outs, sizes,
                                                        device, dtype))
    if "loss_path" in args.only:
        report.run("loss_path", lambda: check_loss_path(sizes, device))
    if {"memory", "precision", "collectives"} & set(args.only):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "cut"
            cut = build_model(tokenizer, sizes.cut, sizes.vocab, seed=3)
            cut.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            if "memory" in args.only:
                report.run("memory", lambda: gpu_memory.check_memory(folder, cut, sizes.memory_T, device))
            if "precision" in args.only:
                report.run("precision", lambda: gpu_memory.check_precision(folder, cut, device))
            if "collectives" in args.only:
                report.run("collectives", lambda: gpu_memory.check_collectives(folder, tokenizer, device))
            del cut
            free(device)
    report.write()
    print_summary(report)
    verdict = "all checks passed" if report.passed else "FAILED"
    print(f"wrote {out}; {verdict} in {time.perf_counter() - report.start:.0f} s")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
