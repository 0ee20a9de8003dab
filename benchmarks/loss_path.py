"""Truncated reverse-KL loss path: peak memory and time of forward + backward, framework vs the naive path.

Shapes are Qwen2.5-7B's LM head: V = 152,064, H = 3,584; T loss positions, K support ids per position; fp32, 2 torch
threads. Every case runs in a fresh process (peak = the child's ru_maxrss) on the same seeded inputs.

lm_head table (hidden states -> loss; gradients w.r.t. the hidden states and the LM-head weight):
  framework     `opd_agents.losses.gather_student_logprobs` (chunk = the default `loss.chunk_size` 1024, and 256
                at the largest T; each chunk recomputed in backward) + `truncated_reverse_kl` with the learner's
                diagnostics (entropy, sampled-token log-prob), as `Learner._loss` calls them.
  naive         full fp32 [T, V] logits -> log_softmax -> one gather of the support and sampled ids -> the same
                `truncated_reverse_kl`; no entropy diagnostic (that would cost two more [T, V] buffers).
  support-only  reference, NOT a framework path: with renormalisation inside the support, log p̂_S = log_softmax over
                the K gathered *logits* — the full-vocabulary logsumexp cancels — so the loss needs only the K
                lm_head rows per position (T·K·H work instead of T·V·H). Raw logits go into the same
                `truncated_reverse_kl` (renormalize=True); there is no entropy or sampled-token log-prob here.
K changes neither the framework's nor the naive path's cost (both compute all V logits: see the T = 1k rows), so
beyond T = 1k those two run at K = 32 only; the support-only reference runs every K.
model table: a Qwen2 with the real LM head (hidden 3,584, V = 152,064, tied embeddings) on a cheap body (1 decoder
layer, MLP width 3,584 instead of 18,944), from token ids: the learner's `StudentScorer` (decoder -> loss rows ->
chunked gather) vs the naive `model(...).logits` -> log_softmax -> gather. Gradients w.r.t. every parameter.
--frozen-head: the lm_head paths at T = 8k with the LM-head weight frozen (gradients w.r.t. the hidden states only,
as with `learner.lora`, whose default target modules leave the head untouched): without the [V, H] weight gradient
the loss path's own memory is what remains.
Agreement: one extra process per table computes the paths on the same inputs (T = 2 chunks, K = 32) and compares
loss and gradients with the naive path's.
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from _common import main, print_table, rss_mib, run_case, save, timed, train_env_tokenizer
from opd_agents import losses
from opd_agents.config import LossConfig

V, H = 152_064, 3_584
CHUNK = LossConfig().chunk_size
SMALL_CHUNK = 256  # a smaller `loss.chunk_size`: [256, V] fp32 blocks (149 MiB) instead of [1024, V] (594 MiB)
SUPPORT_CHUNK = 256  # rows per checkpointed block of the support-only reference ([256, K, H] gathered weights)
PATHS = ("framework", "naive", "support-only")
CHECK_T = 2 * CHUNK  # two chunks: the chunked path's row split is exercised


def support_inputs(T: int, K: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Support ids (T, K), the sampled token (T,) and the teacher's log-probs at both (K ids hold 90% of its mass)."""
    ids = torch.randint(V, (T, K), generator=g)
    teacher = torch.log_softmax(2 * torch.randn(T, K, generator=g), -1) - 0.1
    return {"ids": ids, "sampled": ids[:, 0].clone(), "teacher": teacher, "teacher_sampled": teacher[:, 0].clone()}


def lm_head_inputs(T: int, K: int, head_grad: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded support inputs plus hidden (T, H) and LM-head weight (V, H), the weight trainable unless frozen."""
    g = torch.Generator().manual_seed(seed)
    return support_inputs(T, K, g) | {"hidden": torch.randn(T, H, generator=g).requires_grad_(),
                                      "weight": torch.randn(V, H, generator=g).mul_(0.02).requires_grad_(head_grad)}


def _loss(student: torch.Tensor, x: dict[str, torch.Tensor], **diagnostics: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(student.shape[:-1], dtype=torch.bool)
    loss, _ = losses.truncated_reverse_kl(student, x["teacher"], mask, teacher_logprob=x["teacher_sampled"],
                                          **diagnostics)
    return loss


def framework_loss(hidden: torch.Tensor, weight: torch.Tensor, x: dict[str, torch.Tensor], chunk: int,
                   ) -> torch.Tensor:
    s = losses.gather_student_logprobs(hidden, weight, x["ids"], sampled_ids=x["sampled"], chunk=chunk)
    return _loss(s.logprobs, x, student_logprob=s.sampled_logprob, entropy=s.entropy, support_ids=x["ids"],
                 sampled_ids=x["sampled"])


def naive_loss(logits: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """logits (T, V) -> full log_softmax -> one gather of the support and sampled ids."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.cat([x["ids"], x["sampled"][:, None]], -1))
    return _loss(picked[:, :-1], x, student_logprob=picked[:, -1])


def _support_block(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.einsum("th,tkh->tk", hidden, F.embedding(ids, weight))


def support_only_loss(hidden: torch.Tensor, weight: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = torch.cat([checkpoint(_support_block, hidden[i:i + SUPPORT_CHUNK], weight, x["ids"][i:i + SUPPORT_CHUNK],
                                   use_reentrant=False) for i in range(0, hidden.shape[0], SUPPORT_CHUNK)])
    return _loss(logits, x)


def lm_head_loss(path: str, x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    if path == "framework":
        return framework_loss(x["hidden"], x["weight"], x, chunk)
    if path == "naive":
        return naive_loss(F.linear(x["hidden"], x["weight"]), x)
    return support_only_loss(x["hidden"], x["weight"], x)


def build_model(tokenizer_dir: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoTokenizer

    from opd_agents.zoo.models import TinySize, build_tiny_model

    size = TinySize(layers=1, hidden=H, heads=28, kv_heads=4, intermediate=H, max_positions=8192)
    model = build_tiny_model(AutoTokenizer.from_pretrained(tokenizer_dir), size, seed=seed)
    model.resize_token_embeddings(V, mean_resizing=False)
    return model.train()


def model_inputs(T: int, K: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (1, T) and support inputs for the T - 1 loss positions 1..T-1 (the sampled token is the next id)."""
    g = torch.Generator().manual_seed(seed)
    x = support_inputs(T - 1, K, g)
    x["input_ids"] = torch.cat([torch.randint(V, (1,), generator=g), x["sampled"]])[None]
    return x


def model_loss(path: str, model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    from opd_agents.learner import StudentScorer

    T = x["input_ids"].shape[1]
    attention = torch.ones_like(x["input_ids"])
    if path == "framework":
        positions = torch.arange(1, T)[None]
        lp, entropy, sampled_lp = StudentScorer(model, CHUNK)(x["input_ids"], attention, positions, x["ids"][None],
                                                             x["sampled"][None])
        return _loss(lp[0], x, student_logprob=sampled_lp[0], entropy=entropy[0], support_ids=x["ids"],
                     sampled_ids=x["sampled"])
    return naive_loss(model(input_ids=x["input_ids"], attention_mask=attention).logits[0, :-1], x)


def measure(case: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(2)
    if case["table"] == "lm_head":
        x = lm_head_inputs(case["T"], case["K"], head_grad=not case.get("frozen_head", False))
        params = [t for t in (x["hidden"], x["weight"]) if t.requires_grad]

        def run(path: str) -> torch.Tensor:
            return lm_head_loss(path, x, case.get("chunk", CHUNK))
    else:
        model = build_model(case["tokenizer"])
        x = model_inputs(case["T"], case["K"])
        params = list(model.parameters())

        def run(path: str) -> torch.Tensor:
            return model_loss(path, model, x)
    if case.get("check"):
        return agreement(case["paths"], run, params)
    base = rss_mib()
    with timed() as t:
        loss = run(case["path"])
        loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in params]).norm()
    return t | {"base_rss_mib": base, "loss": loss.item(), "grad_norm": grad_norm.item()}


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return grad


def agreement(paths: list[str], run: Callable[[str], torch.Tensor], params: list[torch.Tensor]) -> dict[str, Any]:
    """Loss and gradients of each path against the naive path's, on the same inputs (naive first, one at a time)."""
    ref = run("naive")
    ref.backward()
    ref_grad = _flat_grad(params)
    out = {}
    for path in paths:
        loss = run(path)
        loss.backward()
        grad = _flat_grad(params)
        out[path] = {"loss": loss.item(), "abs_loss_diff": abs(loss.item() - ref.item()),
                     "rel_grad_err": float((grad - ref_grad).norm() / ref_grad.norm())}
        del grad
    return out


def grid(quick: bool, frozen_head: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """lm_head cases (see the module docstring for which K run where) and model cases; with a frozen head, the
    lm_head paths at the largest T only."""
    Ts, Ks = ([1024], [32]) if quick else ([1024, 4096, 8192], [8, 32, 64])
    small = {"table": "lm_head", "path": "framework", "T": Ts[-1], "K": 32, "chunk": SMALL_CHUNK}
    if frozen_head:
        lm = [{"table": "lm_head", "path": p, "T": Ts[-1], "K": 32} for p in PATHS] + [small]
        return [c | {"frozen_head": True} for c in lm], []
    lm = [{"table": "lm_head", "path": p, "T": T, "K": K} for T in Ts for K in Ks for p in PATHS
          if p == "support-only" or K == 32 or T == Ts[0]]
    model = [{"table": "model", "path": p, "T": T, "K": 32} for T in ([1024] if quick else [1024, 4096])
             for p in ("framework", "naive")]
    return lm + [small], model


def benchmark(args: argparse.Namespace) -> None:
    script = Path(__file__)
    lm_cases, model_cases = grid(args.quick, args.frozen_head)
    checks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = str(train_env_tokenizer(Path(tmp)))
        results = []
        for case in lm_cases + [c | {"tokenizer": tokenizer} for c in model_cases]:
            results.append({k: v for k, v in run_case(script, case).items() if k != "tokenizer"})
            print(results[-1], flush=True)
        if not args.frozen_head:
            check = {"T": CHECK_T, "K": 32, "check": True}
            checks = {"lm_head": run_case(script, check | {"table": "lm_head", "paths": ["framework", "support-only"]}),
                      "model": run_case(script, check | {"table": "model", "tokenizer": tokenizer,
                                                         "paths": ["framework"]})}
    checks = {table: {k: v for k, v in c.items() if isinstance(v, dict) or k == "error"} for table, c in checks.items()}
    save("loss_path" + ("_frozen_head" if args.frozen_head else "") + ("_quick" if args.quick else ""),
         {"V": V, "H": H, "chunk": CHUNK, "small_chunk": SMALL_CHUNK, "support_chunk": SUPPORT_CHUNK, "threads": 2,
          "frozen_head": args.frozen_head, "cases": results, "agreement": {"T": CHECK_T, "K": 32, **checks}})
    report(results, checks, args.frozen_head)


def label(case: dict[str, Any]) -> str:
    if case["path"] != "framework":
        return case["path"]
    return f"framework (chunk {case.get('chunk', CHUNK)})"


def report(results: list[dict[str, Any]], checks: dict[str, dict[str, Any]], frozen_head: bool = False) -> None:
    naive = {(r["table"], r["T"], r["K"]): r for r in results if r["path"] == "naive" and "error" not in r}
    for table in ("lm_head",) if frozen_head else ("lm_head", "model"):
        rows = []
        for r in (r for r in results if r["table"] == table):
            if "error" in r:
                rows.append([label(r), r["T"], r["K"], *["-"] * 4, *[""] * 4, r["error"]])
                continue
            ref = naive.get((table, r["T"], r["K"])) or naive.get((table, r["T"], 32))
            work = r["peak_rss_mib"] - r["base_rss_mib"]
            ratios = ([ref["peak_rss_mib"] / r["peak_rss_mib"], (ref["peak_rss_mib"] - ref["base_rss_mib"]) / work,
                       ref["time_s"] / r["time_s"], ref["cpu_s"] / r["cpu_s"]]
                      if ref and r["path"] != "naive" else [""] * 4)
            rows.append([label(r), r["T"], r["K"], r["peak_rss_mib"] / 1024, work / 1024, r["time_s"], r["cpu_s"],
                         *ratios, f"{r['loss']:.6f}"])
        head = " (frozen LM head: gradients w.r.t. the hidden states only)" if frozen_head else ""
        print_table(f"{table}{head}: V={V:,} H={H:,}, forward+backward, 2 threads; "
                    "× = naive (same T; same K, else K=32) / row",
                    ["path", "T", "K", "peak GiB", "working GiB", "wall s", "CPU s", "peak ×", "working ×", "wall ×",
                     "CPU ×", "loss"], rows)
        if table not in checks:
            continue
        print_table(f"{table}: agreement with the naive path at T={CHECK_T}, K=32",
                    ["path", "loss", "|Δloss|", "rel. grad error"],
                    [[p, v["loss"], v["abs_loss_diff"], v["rel_grad_err"]] if isinstance(v, dict) else [p, v, "", ""]
                     for p, v in checks[table].items()])


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frozen-head", action="store_true",
                        help="the lm_head paths with the LM-head weight frozen (as under learner.lora), largest T only")


if __name__ == "__main__":
    main(__doc__, benchmark, measure, add_args)
