"""Test helpers for the real Qwen2.5-Instruct and Qwen3 tokenizers: where they are, tiny random-init models with their
vocabularies, the official data beside the project, and a scripted policy that emits given response texts.

The tokenizers live beside the project (`../shared/tokenizers`, or `$OPD_AGENTS_TOKENIZERS` naming the folder that
holds `qwen2.5-instruct/` and `qwen3/`); tests that need them are marked `needs_real_tokenizers` and skip with the
reason when they are absent. No weights exist for them: `save_tiny_model` builds a Qwen2 (for Qwen2.5) or Qwen3
model with hidden 64, 2 layers, head_dim 32, tied embeddings — the (V, 64) embedding is most of its ~10M parameters.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pytest
import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opd_agents.rollout.policy import Generation, Policy
from opd_agents.sampling import SamplingParams

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZERS = Path(os.environ.get("OPD_AGENTS_TOKENIZERS", SHARED / "tokenizers"))
QWEN25 = TOKENIZERS / "qwen2.5-instruct"
QWEN3 = TOKENIZERS / "qwen3"
ALFWORLD_DATA = SHARED / "data" / "alfworld"
MATH_DATA = SHARED / "data" / "math"
# The tokens Qwen3 has and Qwen2.5 lacks (every shared token keeps its id).
QWEN3_EXTRA = ["</think>", "</tool_response>", "<think>", "<tool_response>"]

needs_real_tokenizers = pytest.mark.skipif(
    not all((d / "tokenizer.json").is_file() for d in (QWEN25, QWEN3)),
    reason=f"real Qwen2.5/Qwen3 tokenizers not found under {TOKENIZERS} (../shared/tokenizers beside the project, or "
           "set $OPD_AGENTS_TOKENIZERS)")
needs_official_data = pytest.mark.skipif(
    not (ALFWORLD_DATA / "json_2.1.1" / "valid_seen").is_dir() or not (MATH_DATA / "math500_test.jsonl").is_file(),
    reason=f"official ALFWorld games / MATH-500 not found under {SHARED / 'data'}")

Arch = Literal["qwen2", "qwen3"]


def save_tiny_model(tokenizer_dir: Path, out: Path, arch: Arch, seed: int = 0, max_positions: int = 4096) -> Path:
    """A random-init tiny causal LM with the vocabulary of the tokenizer in `tokenizer_dir`, saved with that
    tokenizer (save_pretrained, safetensors) to `out`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                        max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=None,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class ScriptedPolicy(Policy):
    """Answers every prompt with the next of `texts` (cycled), tokenized by `tokenizer`, then its eos (`stop`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> None:
        self.tokenizer, self.texts, self.calls = tokenizer, texts, 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out = []
        for _ in prompts:
            text = self.texts[self.calls % len(self.texts)]
            self.calls += 1
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(Generation(ids, [-1.0] * len(ids), "stop"))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.version = version

    @property
    def max_model_len(self) -> int:
        return 32768
