"""The transformers policy: batched top-p/top-k sampling with a KV cache, on CPU or GPU.

Shapes: prompts are left-padded to (B, P); `attention_mask` grows to (B, P + t) as tokens are generated;
position ids count real tokens only (cumsum of the mask − 1), so a left-padded row sees the same
positions as it would alone. Finished rows keep stepping with a pad token (masked out of the result)
until every row has stopped or `max_new_tokens` is reached.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.config import ModelConfig, model_folder
from opd_agents.devices import resolve_dtype
from opd_agents.quiet_loading import load_progress
from opd_agents.rollout.loading import stop_token_ids
from opd_agents.rollout.policy import Generation, Policy
from opd_agents.sampling import SamplingParams, StepSampler


class HFPolicy(Policy):
    """A transformers causal LM used as the rollout policy."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.version = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward pass → ((B, V) next-token logits, updated KV cache)."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **kwargs, **self._last_only)
        return out.logits[:, -1, :], getattr(out, self._cache_arg)

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, device: str,
                        seed: int = 0) -> HFPolicy:
        folder = model_folder(cfg.path, "student.path")
        with load_progress(folder):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=resolve_dtype(cfg.dtype, device),
                trust_remote_code=cfg.trust_remote_code, use_safetensors=True,  # never the pickled .bin format
            ).to(device)
        return cls(model, tokenizer, seed=seed)

    @property
    def max_model_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Tied embeddings may be sent once; any other gap means the learner and the replica disagree.
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"weight sync does not match the student architecture: missing={sorted(set(missing) - tied)[:5]}, "
                f"unexpected={sorted(unexpected)[:5]}; send the learner model's full state_dict().")
        self.version = version

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFPolicy.generate got an empty prompt; every prompt needs at least one token.")
        generator = self._generator
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        batch, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.stop_ids, device=self.device)

        logits, cache = self._forward(input_ids, mask, positions, None)
        sampler = StepSampler(params, generator)
        tokens, logps = [], []
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        next_pos = positions[:, -1:] + 1
        for step in range(params.max_new_tokens):
            ids, lp = sampler(logits)
            ids = ids.masked_fill(done, self.pad_id)
            tokens.append(ids)
            logps.append(lp)
            finished_now = torch.isin(ids, stop) & ~done
            done = done | finished_now
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            # Finished rows keep attending normally; their later (pad) tokens are cut in _collect.
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
            logits, cache = self._forward(ids.unsqueeze(-1), mask, next_pos, cache)
            next_pos = next_pos + 1
        return self._collect(torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist())

    def _collect(self, tokens: list[list[int]], logps: list[list[float]]) -> list[Generation]:
        """Cut each row after its first stop token."""
        gens = []
        for row_ids, row_lp in zip(tokens, logps):
            end = next((i + 1 for i, t in enumerate(row_ids) if t in self.stop_ids), None)
            if end is None:
                gens.append(Generation(row_ids, row_lp, "length"))
            else:
                gens.append(Generation(row_ids[:end], row_lp[:end], "stop"))
        return gens
