"""Teacher top-K scoring throughput: the `hf` teacher backend vs a naive full-softmax + topk, and their agreement.

Teacher: a randomly initialised `build_tiny_model` of the zoo ALFWorld teacher's size (4 layers, hidden 192) on a
tokenizer trained on env text (V = 502), and the same model with its vocabulary grown to Qwen2.5's V = 152,064.
Batch: B sequences of T tokens, the last T - P of each scored (loss positions), K = 32; fp32, 2 torch threads.
  hf       `teachers.hf.HFTeacher.topk` with the default `chunk_size` (256): backbone once, then per chunk of loss rows
           the LM head, `topk` on the raw logits and one log-sum-exp
  hf_1024  the same with `chunk_size` 1,024 (the default before: a 4x larger [chunk, V] buffer)
  naive  `model(...).logits` for every position [B, T, V] -> log_softmax -> rows at the loss positions -> topk, and
         the sampled token's log-prob (what a straightforward implementation does), with the teacher's own weights.
Throughput = scored (loss) tokens per second: both paths in one process, alternating (hf, naive, hf, ...) after a
warm-up of each, at least 3 calls each and 5 s in all, median per path (alternation keeps a neighbour job's load
from landing on one path only). Peak memory: one more fresh process per path that makes one call. Agreement: the
first calls' outputs compared.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import alternate, main, print_table, run_case, save, save_tiny_model, train_env_tokenizer

from opd_agents.samples import Sample, TeacherTopK

REAL_V = 152_064
K = 32
MIN_REPS, MIN_SECONDS = 3, 5.0  # timed calls: at least 3, and at least 5 s in all


def make_samples(vocab: int, batch: int, length: int, prompt: int, seed: int = 0) -> list[Sample]:
    """`batch` random sequences of `length` ids below `vocab`; positions >= `prompt` are loss positions."""
    g = torch.Generator().manual_seed(seed)
    mask = [0] * prompt + [1] * (length - prompt)
    return [Sample(input_ids=torch.randint(vocab, (length,), generator=g).tolist(), loss_mask=mask,
                   behaviour_logprobs=[0.0] * length, task="bench") for _ in range(batch)]


def hf_teacher(path: str, chunk_size: int | None = None) -> Any:
    from opd_agents.config import TeacherConfig
    from teachers.hf import HFTeacher

    return HFTeacher("teacher", TeacherConfig(model=path, **({"chunk_size": chunk_size} if chunk_size else {})))


@torch.inference_mode()
def naive_topk(model: torch.nn.Module, samples: list[Sample], k: int) -> list[TeacherTopK]:
    ids = torch.tensor([s.input_ids for s in samples])
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float(), dim=-1)
    out = []
    for b, s in enumerate(samples):
        pos = torch.tensor(s.loss_positions())
        rows = logp[b, pos - 1]
        values, top = rows.topk(k, dim=-1)
        out.append(TeacherTopK(top, values, rows.gather(-1, ids[b, pos, None]).squeeze(-1)))
    return out


def measure(case: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(2)
    samples = make_samples(case["tokenizer_vocab"], case["batch"], case["length"], case["prompt"])
    teacher, teacher_1024 = hf_teacher(case["model"]), hf_teacher(case["model"], 1024)
    paths = {"hf": lambda: teacher.topk(samples, K), "hf_1024": lambda: teacher_1024.topk(samples, K),
             "naive": lambda: naive_topk(teacher.model, samples, K)}
    if case["path"] in paths:  # memory: this path alone
        paths[case["path"]]()
        return {}
    first = {name: run() for name, run in paths.items()}
    reps = alternate(paths, MIN_REPS, MIN_SECONDS)
    tokens = sum(s.num_loss_tokens for s in samples)
    return {"tokens": tokens, "agreement": agreement(first["hf"], first["naive"]),
            "agreement_1024": agreement(first["hf_1024"], first["naive"]), "reps": reps,
            **{f"{name}_tokens_per_{unit}": tokens / statistics.median(t[key] for t in r)
               for name, r in reps.items() for unit, key in (("s", "time_s"), ("cpu_s", "cpu_s"))}}


def agreement(hf: list[TeacherTopK], naive: list[TeacherTopK]) -> dict[str, Any]:
    ids_hf, ids_naive = torch.cat([o.topk_ids for o in hf]), torch.cat([o.topk_ids for o in naive])
    return {"topk_ids_equal_fraction": float((ids_hf == ids_naive).float().mean()),
            "max_abs_topk_logprob_diff": float((torch.cat([o.topk_logprobs for o in hf])
                                                - torch.cat([o.topk_logprobs for o in naive])).abs().max()),
            "max_abs_sampled_logprob_diff": float((torch.cat([o.sampled_logprobs for o in hf])
                                                   - torch.cat([o.sampled_logprobs for o in naive])).abs().max())}


def benchmark(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    shape = {"batch": 4, "length": 256, "prompt": 64} if args.quick else {"batch": 8, "length": 512, "prompt": 64}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_env_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_vocab = len(AutoTokenizer.from_pretrained(tok))
        for vocab in (tokenizer_vocab, REAL_V):
            model = save_tiny_model(tok, Path(tmp) / str(vocab), "alfworld-teacher", vocab)
            case = shape | {"model": str(model), "tokenizer_vocab": tokenizer_vocab, "vocab": vocab}
            result = run_case(__file__, case | {"path": "alternating"})
            result["peak_rss_mib"] = {path: run_case(__file__, case | {"path": path})["peak_rss_mib"]
                                      for path in ("hf", "hf_1024", "naive")}
            results.append({k: v for k, v in result.items() if k not in ("model", "path")})
            print(results[-1], flush=True)
    save("teacher_topk" + ("_quick" if args.quick else ""), {"K": K, "threads": 2, **shape, "cases": results})
    rows = []
    for r in results:
        for path in ("hf", "hf_1024", "naive"):
            speedup = r[f"{path}_tokens_per_s"] / r["naive_tokens_per_s"] if path != "naive" else ""
            rows.append([path, f"{r['vocab']:,}", r[f"{path}_tokens_per_s"], r[f"{path}_tokens_per_cpu_s"], speedup,
                         r["peak_rss_mib"][path] / 1024])
    scored = shape["length"] - shape["prompt"]
    print_table(f"teacher top-{K}: B={shape['batch']} × T={shape['length']} ({scored} scored each), 4 layers h192, "
                "fp32, 2 threads", ["path", "V", "tokens/s", "tokens/CPU-s", "× naive", "peak GiB"], rows)
    print_table("agreement (hf vs naive, same batch)", ["V", "top-K ids equal", "max |Δ top-K logp|",
                                                         "max |Δ sampled logp|"],
                [[f"{r['vocab']:,}", *r["agreement"].values()] for r in results])


if __name__ == "__main__":
    main(__doc__, benchmark, measure)
