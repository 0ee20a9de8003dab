"""Combining one optimizer step's per-micro-batch metrics (and across learner ranks) into the step's metrics.

Each micro-batch's metric is weighted by its share of the mini-batch's loss tokens, and the sum is normalised by the
shares of the micro-batches that report the key (a position bucket, a turn or a subsample may be absent from some). A
subset metric "<name>@<tag>" that comes with "num_tokens@<tag>" weighs by its own tokens. A standard error (a key
ending in `_se`, `diagnostics.subsample_se`) of independent estimates combines in quadrature. The sums are plain float
sums, so data-parallel ranks add theirs (`Learner._reduce_metrics`) before `finish_metrics`.
"""
from __future__ import annotations

import math

SE_SUFFIX = "_se"
_SHARE = "share\x00"  # prefix of the accumulated share of each metric key (never a metric name itself)


def accumulate_metrics(acc: dict[str, float], metrics: dict[str, float], share: float) -> None:
    """Add one micro-batch's `metrics`, weighted by its token `share`, into `acc` (plain sums: ranks add theirs).

    A subset metric "<name>@<tag>" (a position bucket, a turn) that comes with "num_tokens@<tag>" weighs by its own
    tokens instead: share · num_tokens@<tag> / num_tokens. An estimate's standard error adds as (weight · se)², the
    variance of a weighted sum of independent estimates. loss, num_tokens and the num_tokens@<tag> weights are not
    metrics of their own."""
    local = metrics.get("num_tokens")
    for k, v in metrics.items():
        if k in ("loss", "num_tokens") or k.startswith("num_tokens@"):
            continue
        _, at, tag = k.partition("@")
        count = metrics.get(f"num_tokens@{tag}") if at else None
        weight = share * count / local if count is not None and local else share
        acc[k] = acc.get(k, 0.0) + ((v * weight) ** 2 if k.endswith(SE_SUFFIX) else v * weight)
        acc[_SHARE + k] = acc.get(_SHARE + k, 0.0) + weight


def finish_metrics(acc: dict[str, float]) -> dict[str, float]:
    """The weighted means (and standard errors) of the summed `acc`, each over the shares that reported its key."""
    out = {}
    for k, v in acc.items():
        if k.startswith(_SHARE):
            continue
        total = acc[_SHARE + k]
        v = math.sqrt(v) if k.endswith(SE_SUFFIX) else v
        out[k] = v / total if total > 0 else v
    return out
