"""Supervised fine-tuning of the zoo's tiny models on (chat messages -> assistant response) pairs.

Owns tokenising a pair (the prompt through the tokenizer's chat template, the response as the assistant turn
ended by ``<|im_end|>``; the loss is on the response tokens, eos included, plus ``prompt_loss_weight`` times the
language-modelling loss on the prompt tokens of the examples that take it) and one small training loop: AdamW,
linear warm-up then cosine decay (a constant high rate makes tiny models swing by tens of points between
checkpoints), batches of similar length (little padding, which is most of the CPU cost), and a stop at
``max_steps`` or a wall-clock budget, whichever comes first.

The rate schedule is a function of the step alone, so a run that reaches ``max_steps`` is the same run on any
machine speed (bit for bit on the same machine and thread count: ``experiments/zoo_determinism.py``). The budget is
a safety stop for a machine far slower than the recipe assumes: a run it stops ends mid-decay, and says so
(``SFTResult.budget_bound``).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.chat_templates import render_with_tokenizer

IGNORE = -100


@dataclass(frozen=True)
class Pair:
    """One demonstration: the prompt messages and the assistant response that should follow them."""

    messages: tuple[dict[str, str], ...]
    response: str


@dataclass
class Example:
    """A tokenised pair: ``labels`` is ``IGNORE`` on the prompt and the token id on the response (+ eos);
    ``prompt_loss``: whether its prompt tokens take the prompt loss (``SFTConfig.prompt_loss_weight``)."""

    input_ids: list[int]
    labels: list[int]
    prompt_loss: bool = True


@dataclass(frozen=True)
class SFTConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.01
    batch_size: int = 16
    max_steps: int = 1000
    time_budget_s: float = 60.0
    grad_clip: float = 1.0
    seed: int = 0
    # Weight of next-token loss on the prompt (0: response only, the usual SFT). A model trained from scratch sees
    # ~10 supervised tokens per ALFWorld example otherwise; predicting the prompt too (its action list repeats the
    # observation's names, its memory lines repeat the action list's) teaches it the copying that choosing an
    # action needs, from ~20x more tokens per step (as OpenAI's fine-tuning API's `prompt_loss_weight`).
    prompt_loss_weight: float = 0.0


@dataclass
class SFTResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    budget_bound: bool = False  # the wall-clock budget stopped the run before max_steps


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt as a model sees it before answering: chat template with the assistant header appended."""
    text = render_with_tokenizer(tokenizer, list(messages), add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, pair: Pair, end_token: str | None = None,
                  prompt_loss: bool = True) -> Example:
    """``end_token``: the token that ends the response (default the tokenizer's eos, ``<|im_end|>``);
    ``prompt_loss``: see :class:`Example`."""
    prompt = prompt_ids(tokenizer, pair.messages)
    end_id = tokenizer.eos_token_id if end_token is None else tokenizer.convert_tokens_to_ids(end_token)
    # The response is tokenised on its own, as a rollout samples it token by token after the header.
    response = tokenizer.encode(pair.response, add_special_tokens=False) + [end_id]
    return Example(prompt + response, [IGNORE] * len(prompt) + response, prompt_loss)


def _batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, sort by length inside chunks of 50 batches, cut into batches, shuffle the batches."""
    order = list(examples)
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda e: len(e.input_ids))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.input_ids)] = 1
    prompt_rows = torch.tensor([e.prompt_loss for e in batch])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "prompt_loss": prompt_rows}


def _loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], prompt_weight: float) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(the loss to train on, the response-token loss to report). The prompt loss is the mean over the prompt tokens
    of the rows whose ``prompt_loss`` is set (none in the batch: the response loss alone)."""
    if prompt_weight == 0.0:
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        return loss, loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                  reduction="none").view_as(targets)
    response = batch["labels"][:, 1:] != IGNORE
    prompt = batch["attention_mask"][:, 1:].bool() & ~response & batch["prompt_loss"][:, None]
    response_loss = per_token[response].mean()
    if not prompt.any():
        return response_loss, response_loss
    return response_loss + prompt_weight * per_token[prompt].mean(), response_loss


def _lr_factor(step: int, config: SFTConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``max_steps``: by step only (a schedule that also
    followed the clock, as this one once did, made the model depend on the machine's speed)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, step / config.max_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], config: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> SFTResult:
    """Train ``model`` in place on ``examples``; ``on_step(step, loss)`` is called after every step."""
    if not examples:
        raise ValueError("train_sft needs at least one example")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    model.train()
    started = time.perf_counter()
    result = SFTResult(steps=0, seconds=0.0)
    batches: list[list[Example]] = []
    while result.steps < config.max_steps:
        if time.perf_counter() - started >= config.time_budget_s:
            result.budget_bound = True
            break
        if not batches:
            batches = _batches(examples, config.batch_size, rng)
        factor = _lr_factor(result.steps, config)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        loss, response_loss = _loss(model, _collate(batches.pop(), tokenizer.pad_token_id),
                                    config.prompt_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        result.steps += 1
        result.losses.append(response_loss.item())
        if on_step is not None:
            on_step(result.steps, result.losses[-1])
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
