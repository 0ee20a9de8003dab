"""Checkpoint selection: choosing a zoo model's SFT checkpoint by a target band on a held-out dev split.

Owns the recipe's :class:`Selection` (target, checkpoint interval, dev split size), the dev split itself (the last
problems of the math train split, held out of the model's demonstrations: :func:`hold_out_dev`) and
:class:`Checkpoints`, which scores a training model at its checkpoints and restores the one nearest the target.
Why: a tiny student's math success jumps by tens of points between nearby steps, and the floats of another machine
(or build seed) shift that curve, so a fixed step count gives a different student on every machine; a target band
gives one that starts in the same place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.zoo.scoring import evaluate_math
from opd_agents.zoo.sft import Pair


@dataclass(frozen=True)
class Selection:
    """Choose a model's SFT checkpoint by a target band on a held-out split instead of taking its last step.

    From ``first_step`` on, every ``every`` steps (and at the last), the model is scored greedily on the last
    ``dev_problems`` problems of the math train split, which it does not train on (the eval split stays untouched);
    the checkpoint whose dev success is nearest ``target`` is kept (ties: the later). Why: a tiny student's math
    success jumps by tens of points between nearby steps and between builds whose floats differ in the last bits (a
    thread count, another CPU, a build seed: ``experiments/results/zoo_builds/determinism.json``), and the main job
    needs a student that starts in the same place on every machine, not one fixed step count.
    """

    target: float
    first_step: int
    every: int = 50
    dev_problems: int = 200


def hold_out_dev(math_pairs: list[Pair], select: Selection) -> tuple[list[Pair], int]:
    """(the math demonstrations left to train on, the index of the first dev problem in the math train split):
    the dev problems are the end of the train split, so the model never trains on what it is selected by."""
    first_dev = len(math_pairs) - select.dev_problems
    return math_pairs[:first_dev], first_dev


class Checkpoints:
    """The :class:`Selection` of one SFT run: scores the model at its checkpoints, keeps the nearest the target."""

    def __init__(self, select: Selection, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 math_env: dict[str, Any], first_dev: int, max_steps: int) -> None:
        """``first_dev``: the index of the first dev problem in the math train split."""
        self.select, self.model, self.tokenizer, self.math_env = select, model, tokenizer, math_env
        self.first_dev, self.max_steps = first_dev, max_steps
        self.dev: dict[int, float] = {}
        self.best: tuple[int, dict[str, torch.Tensor]] | None = None

    def __call__(self, step: int, force: bool = False) -> None:
        """Score the model after ``step`` if it is a checkpoint (or ``force``: the last step of a run the time
        budget stopped, which then still yields a model)."""
        if not force and step != self.max_steps and (step < self.select.first_step or step % self.select.every):
            return
        self.model.eval()
        self.dev[step] = evaluate_math(self.model, self.tokenizer, self.math_env, self.select.dev_problems,
                                       split="train", first=self.first_dev)
        self.model.train()
        if self.best is None or abs(self.dev[step] - self.select.target) <= abs(
                self.dev[self.best[0]] - self.select.target):
            self.best = (step, {k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def finish(self, last_step: int) -> dict[str, Any]:
        """After the run's ``last_step``: score it if the time budget stopped the run between checkpoints, load the
        chosen checkpoint into the model; returns what the manifest records of the selection."""
        if last_step not in self.dev:
            self(last_step, force=True)
        assert self.best is not None, "the last step was scored"
        self.model.load_state_dict(self.best[1])
        self.model.eval()
        return {"target": self.select.target, "dev_problems": self.select.dev_problems,
                "dev_success": {str(k): v for k, v in self.dev.items()}, "chosen_step": self.best[0]}
