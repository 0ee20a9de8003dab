"""The run's signal-fidelity monitor: when to probe, which samples, the teacher's full answers, and the stop rule.

Every `fidelity.every` steps (steps 1, 1 + N, ...) the monitor picks whole samples of the step's rollouts at random
(seeded by run.seed and the step, so a resumed run probes what an uninterrupted one would) until they hold
`fidelity.positions` loss tokens, asks each task's teacher for their full distribution (K = the vocabulary), and has
the learner compare the configured loss's gradient with the exact reverse-KL's (`learner/fidelity.py`). A probe whose
cosine is at or below `fidelity.min_cosine` fails; `fidelity.patience` failures in a row stop the run with a
`SignalFidelityError`. The count of consecutive failures is part of the checkpoint (`failed`).
"""
from __future__ import annotations

import random
from typing import Any

from opd_agents.config import FidelityConfig
from opd_agents.learner.api import LearnerAPI
from opd_agents.samples import Sample, TeacherTopK
from opd_agents.seeding import mix_seed
from teachers.router import TeacherRouter

FIDELITY_STREAM = 0x0F1D  # mixed into the probe's seeds, apart from the rollouts' mix(run.seed, step, task)


class SignalFidelityError(RuntimeError):
    """The configured loss's gradient kept pointing away from the exact reverse-KL's (see the `fidelity` section)."""


class FidelityMonitor:
    def __init__(self, cfg: FidelityConfig, loss_name: str, run_seed: int) -> None:
        self.cfg, self.loss_name, self.run_seed = cfg, loss_name, run_seed
        self.failed = 0  # consecutive probes at or below cfg.min_cosine

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based) runs a probe."""
        return bool(self.cfg.every) and (step - 1) % self.cfg.every == 0

    def probe(self, step: int, samples: list[Sample], teacher_out: list[TeacherTopK], router: TeacherRouter,
              learner: LearnerAPI) -> dict[str, float]:
        """The probe on whole samples picked at random until they hold `fidelity.positions` loss tokens; their
        teachers answer with K = the vocabulary, one call per task. Metrics are prefixed `fidelity/`."""
        seed = mix_seed(self.run_seed, step, FIDELITY_STREAM)
        picked, tokens = [], 0
        for i in random.Random(seed).sample(range(len(samples)), len(samples)):
            if tokens >= self.cfg.positions:
                break
            picked.append(i)
            tokens += samples[i].num_loss_tokens
        picked.sort()
        full: dict[int, TeacherTopK] = {}
        for task in dict.fromkeys(samples[i].task for i in picked):
            mine = [i for i in picked if samples[i].task == task]
            full |= dict(zip(mine, router.topk(task, [samples[i] for i in mine], learner.vocab_size)))
        metrics = learner.probe_fidelity([samples[i] for i in picked], [teacher_out[i] for i in picked],
                                         [full[i] for i in picked], seed)
        return {f"fidelity/{key}": v for key, v in metrics.items()}

    def check(self, metrics: dict[str, Any]) -> None:
        """Count a probe at or below fidelity.min_cosine; stop after fidelity.patience in a row."""
        if "fidelity/cosine" not in metrics:
            return
        cfg, cosine = self.cfg, metrics["fidelity/cosine"]
        self.failed = self.failed + 1 if cosine <= cfg.min_cosine else 0
        if cfg.patience and self.failed >= cfg.patience:
            raise SignalFidelityError(
                f"signal-fidelity probe: the gradient of loss {self.loss_name!r} w.r.t. the student logits had cosine "
                f"<= {cfg.min_cosine:g} with the exact full-vocabulary reverse-KL's at {self.failed} consecutive "
                f"probes (last: cosine {cosine:.3g}, rel_norm {metrics.get('fidelity/rel_norm', 0):.3g}, "
                f"zero_grad_frac {metrics.get('fidelity/zero_grad_frac', 0):.3g}): this loss does not move the student "
                "towards the teacher. Check loss.k, loss.renormalize, loss.log_ratio_clip / clip_eps or a custom "
                "loss's gradient path; fidelity.patience=0 only logs the probe.")
