"""The grid's rows: each a set of config overrides for one comparison of the paper, the tables they belong to, and
which rows each is paired against (`experiments.grid` runs them, `experiments.grid_aggregate` aggregates them)."""
from __future__ import annotations

from dataclasses import dataclass

from opd_agents.config import ConfigError


def _row_keys(name: str = "topk_reverse_kl", k: int = 32, support: str = "teacher_topk", renormalize: bool = True,
              top_p: float = 0.9) -> tuple[str, ...]:
    return (f"loss.name={name}", f"loss.k={k}", f"loss.support={support}",
            f"loss.renormalize={str(renormalize).lower()}", f"rollout.top_p={top_p}")


@dataclass(frozen=True)
class Row:
    name: str  # id for --rows and the run folder
    label: str  # the table's row label
    group: str  # which table: main | ablation | support
    overrides: tuple[str, ...] = ()
    masked: bool = False  # adds loss.special_tokens (needs --special-tokens or the config's loss.special_tokens)
    reference: bool = False  # read from the reference run instead of a training run


# The paper's sampled-token OPD (its code's old policy and dual clip), and the project's previous baseline, which took
# both the advantage and the PPO ratio from the rollout's top-p processed log-prob, without a dual clip.
_SAMPLED = (*_row_keys("sampled_token_opd"), "loss.old_logprob=recomputed", "loss.clip_ratio_c=3.0")
_SAMPLED_ROLLOUT = (*_row_keys("sampled_token_opd"), "loss.old_logprob=rollout", "loss.clip_ratio_c=null")
_ASYNC2 = ("run.pipeline=async", "run.max_staleness=2", "loss.off_policy_correction=none")

ROWS: tuple[Row, ...] = (
    Row("student", "student (before training)", "main", reference=True),
    Row("sampled", "sampled-token OPD", "main", _SAMPLED),
    Row("sampled_mask", "sampled-token OPD + special-token mask", "main", _SAMPLED, True),
    Row("sampled_rollout", "sampled-token OPD, previous baseline (rollout log-probs, no dual clip)", "main",
        _SAMPLED_ROLLOUT),
    Row("topk", "top-K truncated reverse-KL (K=32, teacher top-K, renorm., top-p 0.9)", "main", _row_keys()),
    Row("topk_mask", "top-K truncated reverse-KL + special-token mask", "main", _row_keys(), True),
    Row("teacher", "teacher (reference)", "main", reference=True),
    Row("no_renorm", "top-K, no renormalisation", "ablation", _row_keys(renormalize=False)),
    Row("top_p_1", "top-K, top-p 1.0 rollouts", "ablation", _row_keys(top_p=1.0)),
    *(Row(f"k{k}", f"top-K, K={k}", "ablation", _row_keys(k=k)) for k in (1, 2, 4, 8, 16)),
    Row("student_topk", "support: student top-K", "support", _row_keys(support="student_topk")),
    Row("union", "support: teacher top-K ∪ sampled token", "support",
        _row_keys(support="teacher_topk_union_sampled")),
    # Issue 45's study: samples up to 2 updates stale (run.pipeline: async; checkpoint steps reset the lag), with and
    # without the off-policy correction. Staleness 0 is the `topk` row: an async run with n = 0 is the sync run.
    Row("topk_async2", "top-K, samples ≤ 2 updates stale, uncorrected", "staleness", (*_row_keys(), *_ASYNC2)),
    Row("topk_async2_is", "top-K, ≤ 2 stale, truncated importance weights (C = 2)", "staleness",
        (*_row_keys(), *_ASYNC2, "loss.off_policy_correction=truncate", "loss.importance_cap=2.0")),
    Row("sampled_async2", "sampled-token OPD, ≤ 2 stale, uncorrected", "staleness", (*_SAMPLED, *_ASYNC2)),
)
GROUPS = {"main": "Main comparison (paper Tables 1–2)",
          "ablation": "Ablations (paper Table 3; K=32 / top-p 0.9 / renormalised is the `topk` row)",
          "support": "Support variants (paper Table 4; teacher top-K is the `topk` row)",
          "staleness": "Stale samples (issue 45; staleness 0 is the `topk` row)"}
DIAGNOSTICS = {"grad norm": "train/grad_norm", "clip fraction": "train/clip_fraction", "entropy": "train/entropy",
               "teacher−student gap": "train/gap_mean", "sampled ∉ support": "train/sampled_not_in_support",
               "skipped updates": "train/skipped"}
BASELINE = "sampled"  # the row every other training row is paired against
WITHIN_REFERENCE = "topk"  # the row the ablation, support and staleness rows are also paired against


def select_rows(spec: str) -> list[Row]:
    """`all`, or comma-separated row names and group names (main, ablation, support), in table order."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    names = {r.name for r in ROWS}
    unknown = sorted(wanted - names - set(GROUPS) - {"all"})
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {unknown}; rows: {[r.name for r in ROWS]}, groups: "
                          f"{list(GROUPS)}, or 'all'")
    return [r for r in ROWS if "all" in wanted or r.name in wanted or r.group in wanted]


def within_baselines(row: Row, rows: list[Row]) -> list[str]:
    """The rows besides BASELINE that `row` is paired against, among `rows`: WITHIN_REFERENCE for an ablation,
    support or staleness row, then for a support or staleness row every row of its group listed before it."""
    names = [r.name for r in rows]
    if row.group not in ("ablation", "support", "staleness") or row.name not in names:
        return []
    out = [WITHIN_REFERENCE] if WITHIN_REFERENCE in names and row.name != WITHIN_REFERENCE else []
    if row.group in ("support", "staleness"):
        out += [r.name for r in rows[:names.index(row.name)] if r.group == row.group and not r.reference]
    return out
