"""LoRA adapters (peft) on the student: attach, merged weights for rollouts and exports, adapter checkpoints.

With `learner.lora` set only the adapters train (less optimizer memory); the truncated-KL loss is unchanged.
Rollout workers and `save_pretrained` exports receive MERGED weights (base + B·A·scale) under the base model's
own parameter names, so everything downstream loads them like a fully fine-tuned student. Checkpoints also keep
the adapter itself (`<checkpoint>/adapter/`) so a resumed run continues the same adapter and optimizer state.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from opd_agents.config import LoraConfig

ADAPTER_DIR = "adapter"


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError("learner.lora needs peft: pip install opd-agents[lora]") from exc
    return peft


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, adapter_path: str | Path | None = None) -> torch.nn.Module:
    """Wrap `model` with trainable LoRA adapters (fresh, or loaded from `adapter_path` to resume)."""
    peft = _peft()
    if adapter_path is not None:
        return peft.PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the base model with the adapters folded in (the training model is left untouched)."""
    return copy.deepcopy(model).merge_and_unload()


def save_merged_and_adapter(model: torch.nn.Module, path: str | Path) -> None:
    merged_model(model).save_pretrained(path)
    model.save_pretrained(Path(path) / ADAPTER_DIR)
