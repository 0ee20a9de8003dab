"""Run plots show the new signals: a ±2 SE band on subsample estimates and the signal-fidelity figure."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt

from opd_agents.run import plot


def test_estimates_get_a_band_and_the_probe_a_figure(tmp_path, monkeypatch):
    records = [{"step": s, "train/entropy": 0.3, "train/entropy_se": 0.02, "train/gap_mean": -0.2,
                **({"fidelity/cosine": 0.9, "fidelity/rel_norm": 1.1} if s % 2 else {})} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bands = []
    original = plt.Axes.fill_between
    monkeypatch.setattr(plt.Axes, "fill_between", lambda ax, x, lo, hi, **kw: bands.append((x, lo, hi))
                        or original(ax, x, lo, hi, **kw))
    written = {p.name for p in plot.plot_run(tmp_path)}
    assert {"entropy.png", "teacher_student_gap.png", "signal_fidelity.png"} <= written
    assert len(bands) == 1 and list(bands[0][1]) == [0.3 - 0.04] * 5  # only the curve with a logged SE
