"""The paper's toy bias–variance study (Section 3.1, Figure 1): γ-discounted return-to-go estimators of the
sequence-level reverse-KL gradient, from γ = 0 (token-level OPD) to γ = 1 (sequence-level, unbiased).

`python -m experiments.toy_bias_variance [--out runs/toy] [--steps N] [--seeds N] ...`

Setting (the paper's Appendix C is not in our copy of the text, so this is our own small instance of its
"two-task toy"): two tasks (prompts) x with horizons T_x (default 4 and 8 tokens) over a V-token vocabulary
(default 3). Student and teacher are tabular autoregressive policies: a softmax over logits indexed by the context
(task, position, previous token). The teacher's logits are random and sharp, the student's random and flat; the
tasks share no parameters. Everything exact is computed by enumerating all V^T sequences of each task.

Estimator, per sampled sequence y of task x, with per-token reward r_t = log p_T(y_t|c_t) − log p_S(y_t|c_t) and
R^γ_t = Σ_{t'≥t} γ^{t'−t} r_{t'} (`discounted_returns` below):
    ĝ_γ(y) = −Σ_t R^γ_t ∇_θ log p_S(y_t | c_t),
averaged over a batch of N sequences. γ = 1 is an unbiased estimate of ∇_θ KL(p_S ‖ p_T) (the sequence-level
reverse-KL); γ = 0 is token-level OPD, which drops the future-reward coupling — exactly the gradient of the
library's on-policy `sampled_token_opd` (tests/experiments/test_toy_bias_variance.py checks both).

Measured per task and γ, at the student's initial parameters:
- exact bias ‖E ĝ_γ − ∇J‖, exact variance tr Cov(ĝ_γ) for batch size N, cos(E ĝ_γ, ∇J) (by enumeration);
- Monte-Carlo over `--variance-batches` sampled batches (same batches for every γ): variance, bias of the mean, MSE;
- learning curves: plain SGD with ĝ_γ from the same start, exact KL(p_S ‖ p_T) after every step, over seeds.

Writes <out>/results.json, <out>/results.md, <out>/plots/{bias_variance,learning_curves}.png.
The defaults take 10–30 s on one busy CPU core (the learning curves are most of it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DTYPE = torch.float64


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return-to-go `(..., T)`: R_t = Σ_{t' ≥ t, masked} γ^{d(t, t')} r_{t'} at masked t, else 0.

    rewards `(..., T)` per-token (e.g. log p_T − log p_S), mask `(..., T)`. d counts masked tokens between t and t'
    (environment / prompt tokens between turns neither earn reward nor discount). γ=0: token-level, γ=1:
    sequence-level (causal). Solves R_t = r_t + γ^{m_t}·R_{t+1} by a parallel (Hillis–Steele) scan: log2(T)
    vectorised steps, only products of factors ≤ 1, so no γ^{-t} overflow for long sequences.
    """
    m = mask.bool()
    acc = torch.where(m, rewards, torch.zeros_like(rewards))
    factor = torch.ones_like(acc).masked_fill(m, gamma)
    span = 1
    while span < acc.shape[-1]:
        # Compose the step "R_t = acc_t + factor_t · R_{t+span}" with the one starting at t+span (zeros past T).
        acc = acc + factor * F.pad(acc[..., span:], (0, span))
        factor = factor * F.pad(factor[..., span:], (0, span))
        span *= 2
    return torch.where(m, acc, torch.zeros_like(acc))


@dataclass
class ToyConfig:
    vocab: int = 3
    lengths: tuple[int, ...] = (4, 8)
    teacher_scale: float = 2.0
    student_scale: float = 0.5
    gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
    batch: int = 8
    variance_batches: int = 2000
    steps: int = 300
    lr: float = 1.0
    seeds: int = 5
    seed: int = 0


@dataclass
class Task:
    """All V^T sequences of one task and the flat parameter index of each (position, previous token) context."""

    seqs: torch.Tensor  # (S, T) token ids
    ctx: torch.Tensor  # (S, T) index into the task's flattened contexts (T · (V + 1))


def enumerate_task(length: int, vocab: int) -> Task:
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long).reshape(-1, length)
    prev = torch.cat([torch.full_like(seqs[:, :1], vocab), seqs[:, :-1]], dim=1)  # vocab = beginning of sequence
    ctx = torch.arange(length) * (vocab + 1) + prev
    return Task(seqs, ctx)


def token_logprobs(logits: torch.Tensor, task: Task, rows: torch.Tensor | None = None) -> torch.Tensor:
    """log p(y_t | c_t) `(S, T)` for the task's sequences (or the subset `rows`); logits `(T · (V + 1), V)`."""
    seqs, ctx = (task.seqs, task.ctx) if rows is None else (task.seqs[rows], task.ctx[rows])
    return torch.log_softmax(logits, -1)[ctx, seqs]


def sequence_logprobs(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """log p(y) `(S,)` of every sequence of the task."""
    return token_logprobs(logits, task).sum(-1)


def reverse_kl(student_seq: torch.Tensor, teacher_seq: torch.Tensor) -> torch.Tensor:
    """Exact KL(p_S ‖ p_T) from the log-probs `(S,)` of all sequences (differentiable in `student_seq`)."""
    return (student_seq.exp() * (student_seq - teacher_seq)).sum()


def per_sequence_estimates(student: torch.Tensor, teacher: torch.Tensor, task: Task, gamma: float,
                           rows: torch.Tensor | None = None) -> torch.Tensor:
    """ĝ_γ(y) for each sequence (or each of `rows`), flattened `(S, P)`, P = T · (V + 1) · V.

    Uses ∇_θ[c] log softmax(θ[c])[y] = onehot(y) − p(·|c); contexts include the position, so no two tokens of one
    sequence share a parameter row."""
    seqs, ctx = (task.seqs, task.ctx) if rows is None else (task.seqs[rows], task.ctx[rows])
    reward = token_logprobs(teacher, task, rows) - token_logprobs(student, task, rows)
    ret = discounted_returns(reward, torch.ones_like(seqs, dtype=torch.bool), gamma)  # (S, T)
    probs = torch.softmax(student, -1)
    score = torch.nn.functional.one_hot(seqs, student.shape[-1]).to(DTYPE) - probs[ctx]  # (S, T, V)
    grads = torch.zeros(len(seqs), *student.shape, dtype=DTYPE)
    grads[torch.arange(len(seqs)).unsqueeze(1), ctx] = -ret.unsqueeze(-1) * score
    return grads.reshape(len(seqs), -1)


def exact_gradient(student: torch.Tensor, teacher: torch.Tensor, task: Task) -> torch.Tensor:
    """∇_θ KL(p_S ‖ p_T) by autograd through the enumeration, flattened `(P,)`."""
    theta = student.detach().clone().requires_grad_(True)
    kl = reverse_kl(sequence_logprobs(theta, task), sequence_logprobs(teacher, task))
    (grad,) = torch.autograd.grad(kl, theta)
    return grad.reshape(-1)


def measure(student: torch.Tensor, teacher: torch.Tensor, task: Task, cfg: ToyConfig,
            gen: torch.Generator) -> list[dict[str, float]]:
    """Exact and Monte-Carlo bias / variance of the batch estimator for every γ (common random batches)."""
    probs = sequence_logprobs(student, task).exp()
    true = exact_gradient(student, teacher, task)
    batches = torch.multinomial(probs.expand(cfg.variance_batches, -1), cfg.batch, replacement=True, generator=gen)
    rows = []
    for gamma in cfg.gammas:
        per_seq = per_sequence_estimates(student, teacher, task, gamma)  # (S, P)
        mean = probs @ per_seq
        var = float(probs @ (per_seq - mean).pow(2).sum(-1)) / cfg.batch
        estimates = per_seq[batches].mean(1)  # (M, P)
        mc_mean = estimates.mean(0)
        rows.append({
            "gamma": gamma,
            "bias": float((mean - true).norm()),
            "relative_bias": float((mean - true).norm() / true.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(mean, true, dim=0)),
            "variance": var,
            "relative_variance": var / float(true.pow(2).sum()),
            "mc_variance": float((estimates - mc_mean).pow(2).sum(-1).mean()),
            "mc_bias": float((mc_mean - true).norm()),
            "mc_mse": float((estimates - true).pow(2).sum(-1).mean()),
        })
    return rows


def train_curve(student: torch.Tensor, teacher: torch.Tensor, task: Task, gamma: float, cfg: ToyConfig,
                gen: torch.Generator) -> list[float]:
    """Exact KL after each of cfg.steps plain-SGD steps with the batch estimator ĝ_γ (step 0 = the start)."""
    theta, teacher_seq = student.clone(), sequence_logprobs(teacher, task)
    student_seq = sequence_logprobs(theta, task)  # one enumeration pass gives the exact KL and the sampling law
    curve = [float(reverse_kl(student_seq, teacher_seq))]
    for _ in range(cfg.steps):
        rows = torch.multinomial(student_seq.exp(), cfg.batch, replacement=True, generator=gen)
        grad = per_sequence_estimates(theta, teacher, task, gamma, rows).mean(0)
        theta = theta - cfg.lr * grad.reshape(theta.shape)
        student_seq = sequence_logprobs(theta, task)
        curve.append(float(reverse_kl(student_seq, teacher_seq)))
    return curve


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=DTYPE)
    return float(t.mean()), float(t.std(unbiased=False))


def run(cfg: ToyConfig) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(cfg.seed)
    results: dict[str, Any] = {"config": asdict(cfg), "tasks": {}}
    for length in cfg.lengths:
        task = enumerate_task(length, cfg.vocab)
        shape = (length * (cfg.vocab + 1), cfg.vocab)
        teacher = cfg.teacher_scale * torch.randn(shape, dtype=DTYPE, generator=gen)
        student = cfg.student_scale * torch.randn(shape, dtype=DTYPE, generator=gen)
        rows = measure(student, teacher, task, cfg, gen)
        curves = {}
        for row in rows:
            runs = [train_curve(student, teacher, task, row["gamma"],
                                cfg, torch.Generator().manual_seed(cfg.seed * 1000 + s)) for s in range(cfg.seeds)]
            tail = max(1, cfg.steps // 10)
            finals = [sum(c[-tail:]) / tail for c in runs]
            rises = [sum(b > a for a, b in zip(c, c[1:])) / max(1, cfg.steps) for c in runs]
            row["final_kl_mean"], row["final_kl_std"] = _mean_std(finals)
            row["kl_increase_fraction"] = sum(rises) / len(rises)
            curves[str(row["gamma"])] = runs
        initial = reverse_kl(sequence_logprobs(student, task), sequence_logprobs(teacher, task))
        results["tasks"][f"T={length}"] = {"initial_kl": float(initial), "rows": rows, "curves": curves}
    return results


def to_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = ["# Toy bias–variance study (γ-discounted return-to-go OPD estimators)", "",
             f"V = {cfg['vocab']}, batch N = {cfg['batch']}, {cfg['variance_batches']} Monte-Carlo batches, "
             f"SGD lr {cfg['lr']} for {cfg['steps']} steps × {cfg['seeds']} seeds. γ = 0: token-level OPD; "
             "γ = 1: sequence-level reverse-KL (unbiased). Bias and variance are of the batch estimator at the "
             "student's initial parameters (exact, by enumeration; MC = measured over sampled batches). "
             "Final KL = exact KL(p_S‖p_T) averaged over the last 10% of steps, mean ± std over seeds; "
             "'KL rose' = fraction of SGD steps that increased the exact KL.", ""]
    for name, task in results["tasks"].items():
        lines += [f"## Task {name} (initial KL {task['initial_kl']:.3f})", "",
                  "| γ | bias | rel. bias | cos(E ĝ, ∇J) | variance | rel. variance | MC variance | MC MSE "
                  "| final KL | KL rose |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in task["rows"]:
            lines.append(f"| {r['gamma']:g} | {r['bias']:.4f} | {r['relative_bias']:.3f} | {r['cosine']:.3f} "
                         f"| {r['variance']:.4f} | {r['relative_variance']:.3f} | {r['mc_variance']:.4f} "
                         f"| {r['mc_mse']:.4f} | {r['final_kl_mean']:.4f} ± {r['final_kl_std']:.4f} "
                         f"| {r['kl_increase_fraction']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        gammas = [r["gamma"] for r in task["rows"]]
        ax.plot(gammas, [r["variance"] for r in task["rows"]], "o-", label="variance tr Cov(ĝ) (exact)")
        ax.plot(gammas, [r["mc_variance"] for r in task["rows"]], "x--", label="variance (MC)")
        ax.plot(gammas, [r["bias"] ** 2 for r in task["rows"]], "s-", label="bias² (exact)")
        ax.plot(gammas, [r["mc_mse"] for r in task["rows"]], "^:", label="MSE vs ∇J (MC)")
        ax.set_xlabel("γ")
        ax.set_title(f"task {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out_dir / "bias_variance.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        for gamma, runs in task["curves"].items():
            curves = torch.tensor(runs, dtype=DTYPE)
            steps = range(curves.shape[1])
            ax.plot(steps, curves.mean(0), label=f"γ={float(gamma):g}")
            ax.fill_between(steps, curves.min(0).values, curves.max(0).values, alpha=0.15)  # range over seeds
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_ylabel("exact KL(p_S ‖ p_T)")
        ax.set_title(f"task {name}: mean over seeds, band = min–max")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "learning_curves.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(prog="python -m experiments.toy_bias_variance", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy"))
    parser.add_argument("--vocab", type=int, default=defaults.vocab)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(defaults.lengths), help="one horizon per task")
    parser.add_argument("--gammas", type=float, nargs="+", default=list(defaults.gammas))
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--variance-batches", type=int, default=defaults.variance_batches)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    cfg = ToyConfig(vocab=args.vocab, lengths=tuple(args.lengths), gammas=tuple(args.gammas), batch=args.batch,
                    variance_batches=args.variance_batches, steps=args.steps, lr=args.lr, seeds=args.seeds,
                    seed=args.seed)
    if cfg.vocab ** max(cfg.lengths) > 200_000:
        parser.error(f"vocab^length = {cfg.vocab ** max(cfg.lengths)} sequences is too many to enumerate")
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds overhead (milliseconds per op on a busy machine)
    results = run(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = to_markdown(results)
    (args.out / "results.md").write_text(markdown + "\n")
    plot(results, args.out / "plots")
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'plots'}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
