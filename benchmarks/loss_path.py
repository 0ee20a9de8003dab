"""Truncated reverse-KL loss path: peak memory and time of forward + backward, the learner's path vs the naive path.

Shapes are Qwen2.5-7B's LM head: V = 152,064, H = 3,584; T loss positions, K support ids per position; fp32, 2 torch
threads. Every case runs in a fresh process (peak = the child's ru_maxrss) on the same seeded inputs.

Paths:
  framework               the learner's default path, run by the learner's own functions (`StudentScorer`,
                          `score_student`, the registered loss) with the default `LossConfig`: support logits (only
                          the K LM-head rows of each position, `loss.chunk_size` = 1,024 rows per chunk) and the
                          full-vocabulary diagnostics (entropy, sampled-token gap, student support mass) without
                          gradient on `loss.diagnostic_positions` = 256 randomly drawn positions.
  framework (full-V chunked)  the same functions with `loss.student_logits: full`, the learner's path before the
                          support logits: all V logits per position in checkpointed chunks of 1,024 rows (recomputed in
                          backward), every diagnostic exact.
  naive                   full fp32 [T, V] logits -> log_softmax -> one gather of the support and sampled ids ->
                          `truncated_reverse_kl` (with the sampled-token gap; no entropy: two more [T, V] buffers).
Tables:
  lm_head   hidden states (T, H) -> loss. The framework paths get them through `StudentScorer` with a stand-in model
            whose decoder returns them. Head `trained`: gradients w.r.t. the hidden states and the LM-head weight;
            `frozen`: the hidden states only (as under `learner.lora`, whose default target modules leave the head
            alone), which removes the (V, H) weight gradient every path pays and leaves the loss path's own memory.
  model     a Qwen2 with the real LM head (hidden 3,584, V = 152,064, tied embeddings) on a cheap body (1 decoder
            layer, MLP width 3,584 instead of 18,944), from token ids; gradients w.r.t. every parameter.
Agreement: one extra process per table computes every path on the same inputs (T = 2,048 = two chunks, K = 32,
head trained) and compares loss and gradients with the naive path's.
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    main,
    print_table,
    rss_mib,
    run_case,
    save,
    timed,
    train_env_tokenizer,
)

from opd_agents.config import LossConfig
from opd_agents.learner import losses
from opd_agents.learner.batching import MicroBatch
from opd_agents.learner.loss_inputs import LossInputs
from opd_agents.learner.registry import get_loss
from opd_agents.learner.student import StudentScorer, score_student

V, H = 152_064, 3_584
PATHS = {"framework": "framework", "full-v": "framework (full-V chunked)", "naive": "naive"}
STUDENT_LOGITS = {"framework": "auto", "full-v": "full"}
CHUNK = LossConfig().chunk_size
CHECK_T = 2 * CHUNK  # two chunks: the chunked paths' row split is exercised


def support_inputs(T: int, K: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Support ids (T, K), the sampled token (T,) and the teacher's log-probs at both (K ids hold 90% of its mass)."""
    ids = torch.randint(V, (T, K), generator=g)
    teacher = torch.log_softmax(2 * torch.randn(T, K, generator=g), -1) - 0.1
    return {"ids": ids, "sampled": ids[:, 0].clone(), "teacher": teacher, "teacher_sampled": teacher[:, 0].clone()}


def lm_head_inputs(T: int, K: int, head_grad: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded support inputs plus hidden (T, H) and the LM-head weight (V, H), trainable unless frozen."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(V, H, generator=g).mul_(0.02), requires_grad=head_grad)
    return support_inputs(T, K, g) | {"hidden": torch.randn(T, H, generator=g).requires_grad_(), "weight": weight}


class GivenHiddenStates(torch.nn.Module):
    """A causal-LM stand-in whose decoder returns the given hidden states (T, H), so that `StudentScorer` runs the
    learner's loss path from them (loss position l reads hidden row l: its input ids are a dummy (1, T + 1))."""

    def __init__(self, hidden: torch.Tensor, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.hidden = hidden
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = weight
        self.lm_head.bias = None

    def get_decoder(self) -> Callable[..., SimpleNamespace]:
        return lambda **_: SimpleNamespace(last_hidden_state=self.hidden[None])

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def micro_batch(input_ids: torch.Tensor, x: dict[str, torch.Tensor]) -> MicroBatch:
    """One sample (B = 1) whose loss positions 1..T read the support inputs' T rows."""
    T = x["ids"].shape[0]
    return MicroBatch(input_ids, torch.ones_like(input_ids), torch.arange(1, T + 1)[None],
                      torch.ones(1, T, dtype=torch.bool), x["ids"][None], x["teacher"][None], None, x["sampled"][None],
                      torch.zeros(1, T), x["teacher_sampled"][None])


def framework_loss(model: torch.nn.Module, mb: MicroBatch, lc: LossConfig) -> torch.Tensor:
    """What `Learner._loss` computes for one micro-batch (scorer built here: the learner builds it once)."""
    mask, spec = mb.loss_mask, get_loss(lc.name)
    student = score_student(StudentScorer(model, lc.chunk_size), mb, mb.support_ids,
                            mask if spec.uses_support_logits(lc) else None, lc.diagnostic_positions)
    return spec.fn(LossInputs.from_rows(mb, student, mask, float(mask.sum()), 1.0), lc)[0]


def naive_loss(logits: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """logits (T, V) -> full log_softmax -> one gather of the support and sampled ids."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.cat([x["ids"], x["sampled"][:, None]], -1))
    mask = torch.ones(picked.shape[:-1], dtype=torch.bool)
    loss, _ = losses.truncated_reverse_kl(picked[:, :-1], x["teacher"], mask, student_logprob=picked[:, -1],
                                          teacher_logprob=x["teacher_sampled"])
    return loss


def loss_config(path: str, chunk: int = CHUNK) -> LossConfig:
    """The learner's defaults, except which student logits and how many rows per chunk."""
    return LossConfig(student_logits=STUDENT_LOGITS[path], chunk_size=chunk)


def lm_head_loss(path: str, x: dict[str, torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    if path == "naive":
        return naive_loss(F.linear(x["hidden"], x["weight"]), x)
    dummy_ids = torch.zeros(1, x["hidden"].shape[0] + 1, dtype=torch.long)
    model = GivenHiddenStates(x["hidden"], x["weight"])
    return framework_loss(model, micro_batch(dummy_ids, x), loss_config(path, chunk))


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


def model_loss(path: str, model: torch.nn.Module, x: dict[str, torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    if path == "naive":
        logits = model(input_ids=x["input_ids"], attention_mask=torch.ones_like(x["input_ids"])).logits
        return naive_loss(logits[0, :-1], x)
    return framework_loss(model, micro_batch(x["input_ids"], x), loss_config(path, chunk))


def measure(case: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(2)
    if case["table"] == "lm_head":
        x = lm_head_inputs(case["T"], case["K"], head_grad=case["head"] == "trained")
        params = [t for t in (x["hidden"], x["weight"]) if t.requires_grad]

        def run(path: str) -> torch.Tensor:
            return lm_head_loss(path, x, case.get("chunk", CHUNK))
    else:
        model = build_model(case["tokenizer"])
        x = model_inputs(case["T"], case["K"])
        params = list(model.parameters())

        def run(path: str) -> torch.Tensor:
            return model_loss(path, model, x, case.get("chunk", CHUNK))
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


def grid(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """lm_head cases (every head × T × K × path) and model cases (every model T × path, K = 32), naive last; the
    framework paths once per `--chunks` size."""
    variants = [{"path": p, "chunk": c} for p in args.paths if p != "naive" for c in args.chunks]
    variants += [{"path": "naive"}] if "naive" in args.paths else []
    lm = [{"table": "lm_head", "head": head, "T": T, "K": K} | v
          for head in args.heads for T in args.T for K in args.K for v in variants]
    model = [{"table": "model", "head": "trained", "T": T, "K": 32} | v for T in args.model_T for v in variants]
    return lm, model


def benchmark(args: argparse.Namespace) -> None:
    if args.quick:
        args.T, args.K, args.heads, args.model_T = [1024], [32], ["trained"], [1024]
    script = Path(__file__)
    lm_cases, model_cases = grid(args)
    checks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = str(train_env_tokenizer(Path(tmp))) if model_cases else ""
        results = []
        for case in lm_cases + [c | {"tokenizer": tokenizer} for c in model_cases]:
            results.append({k: v for k, v in run_case(script, case).items() if k != "tokenizer"})
            print(results[-1], flush=True)
        if args.check:
            check = {"T": CHECK_T, "K": 32, "check": True, "head": "trained",
                     "paths": [p for p in PATHS if p != "naive"]}
            checks["lm_head"] = run_case(script, check | {"table": "lm_head"})
            if model_cases:
                checks["model"] = run_case(script, check | {"table": "model", "tokenizer": tokenizer})
    checks = {table: {k: v for k, v in c.items() if isinstance(v, dict) or k == "error"} for table, c in checks.items()}
    defaults = LossConfig()
    save("loss_path" + ("_quick" if args.quick else ""),
         {"V": V, "H": H, "chunk": defaults.chunk_size, "diagnostic_positions": defaults.diagnostic_positions,
          "threads": 2, "cases": results, "agreement": {"T": CHECK_T, "K": 32, **checks}})
    report(results, checks)


def label(case: dict[str, Any]) -> str:
    chunk = case.get("chunk", CHUNK)
    return PATHS[case["path"]] + (f", chunk {chunk}" if chunk != CHUNK else "")


def report(results: list[dict[str, Any]], checks: dict[str, dict[str, Any]]) -> None:
    naive = {(r["table"], r["head"], r["T"], r["K"]): r for r in results if r["path"] == "naive" and "error" not in r}
    for table in ("lm_head", "model"):
        rows = []
        for r in (r for r in results if r["table"] == table):
            if "error" in r:
                rows.append([label(r), r["head"], r["T"], r["K"], *["-"] * 4, *[""] * 4, r["error"]])
                continue
            ref = naive.get((table, r["head"], r["T"], r["K"])) or naive.get((table, r["head"], r["T"], 32))
            work = r["peak_rss_mib"] - r["base_rss_mib"]
            ratios = ([ref["peak_rss_mib"] / r["peak_rss_mib"], (ref["peak_rss_mib"] - ref["base_rss_mib"]) / work,
                       ref["time_s"] / r["time_s"], ref["cpu_s"] / r["cpu_s"]]
                      if ref and r["path"] != "naive" else [""] * 4)
            rows.append([label(r), r["head"], r["T"], r["K"], r["peak_rss_mib"] / 1024, work / 1024,
                         r["time_s"], r["cpu_s"], *ratios, f"{r['loss']:.6f}"])
        if rows:
            print_table(f"{table}: V={V:,} H={H:,}, forward+backward, 2 threads; × = naive (same head and T; same K, "
                        "else K=32) / row",
                        ["path", "head", "T", "K", "peak GiB", "working GiB", "wall s", "CPU s", "peak ×",
                         "working ×", "wall ×", "CPU ×", "loss"], rows)
        if table in checks:
            print_table(f"{table}: agreement with the naive path at T={CHECK_T}, K=32",
                        ["path", "loss", "|Δloss|", "rel. grad error"],
                        [[PATHS.get(p, p), v["loss"], v["abs_loss_diff"], v["rel_grad_err"]] if isinstance(v, dict)
                         else [p, v, "", ""] for p, v in checks[table].items()])


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 8192], help="lm_head loss positions")
    parser.add_argument("--K", type=int, nargs="+", default=[32], help="support sizes (lm_head table)")
    parser.add_argument("--heads", nargs="+", choices=["trained", "frozen"], default=["trained", "frozen"],
                        help="lm_head table: LM-head weight trained (gradient w.r.t. it too) and/or frozen")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                        help="paths to time (the agreement check compares every path with naive)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[CHUNK],
                        help="loss.chunk_size values for the framework paths (default: the config default)")
    parser.add_argument("--model-T", type=int, nargs="*", default=[1024, 4096],
                        help="model-table sequence lengths (none: skip the model table)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the agreement processes")


if __name__ == "__main__":
    main(__doc__, benchmark, measure, add_args)
