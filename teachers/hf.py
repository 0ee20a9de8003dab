"""The `hf` teacher backend: a transformers causal LM scoring samples on CPU (fp32) or CUDA (bf16).

Shapes: per sample, N = number of loss positions, K = requested support size; results are `TeacherTopK` with
topk_ids/topk_logprobs (N, K) and sampled_logprobs (N,). A sample is scored as its teacher sequences
(`templates.teacher_views`: one, or several when a teacher template re-renders history differently); internally a
batch is (B, L) right-padded teacher sequences, the backbone gives hidden states (B, L, H), and only the M rows that
precede a loss position are gathered (M, H) before the LM head runs on them `chunk_size` (default 256) rows at a
time — so the fp32 logits buffer is at most (chunk_size, V), never (T, V) for a whole sequence; the top-K is taken on
the raw logits and normalised by one in-place log-sum-exp per row (no second (chunk_size, V) buffer).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_agents.config import TeacherConfig, model_folder
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.quiet_loading import load_progress
from opd_agents.samples import Sample, TeacherTopK
from teachers.registry import Teacher, check_options, register_teacher
from teachers.templates import TeacherView, teacher_views

# Loss rows per LM-head chunk when `chunk_size` is unset: a (256, V) fp32 buffer is 156 MB at V = 152k (623 MB at
# 1,024). Chosen for memory: which is faster depends on the CPU (1,024 rows 1.06x on an Intel Xeon, 1.69x on an AMD
# EPYC; benchmarks/teacher_topk.py), so throughput-bound runs may raise `chunk_size`.
CHUNK_SIZE = 256


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sample indices so that batch_size * longest_length <= budget (a longer sample goes alone).

    Sorting by length first keeps padding small; the caller restores the original order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """(rows, V) -> (rows, 1) log-sum-exp, overwriting `logits` with exp(logits - max).

    `torch.logsumexp` writes exp(x - max) into a new (rows, V) tensor: 156 MB per 256 rows at V = 152k, as much as the
    logits themselves. Done in place, the teacher's chunk holds one (rows, V) buffer. Rows whose max is not finite
    (all -inf) shift by 0, as `torch.logsumexp` does, so they give -inf rather than NaN."""
    top = logits.amax(dim=-1, keepdim=True)
    top = top.masked_fill(~torch.isfinite(top), 0.0)
    return logits.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)


def topk_from_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, k: int, chunk_size: int,
                     softcap: float | None = None, given: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (M, H), targets (M,) -> top-K ids (M, K) int64, their log-probs (M, K) fp32, target log-probs (M,) fp32.

    With `given` (M, K) the ids are those instead of the top-K (scoring the student's own top-K support)."""
    ids, vals, sampled = [], [], []
    for lo in range(0, hidden.shape[0], chunk_size):
        logits = lm_head(hidden[lo:lo + chunk_size]).float()
        if softcap is not None:
            logits = logits.div_(softcap).tanh_().mul_(softcap)
        # log p = logit - logsumexp(logits): top-K and gathers on the raw logits, then one (rows, 1) subtraction —
        # the same numbers as a full log_softmax without a second (rows, V) buffer (see `logsumexp_`).
        if given is None:
            v, i = logits.topk(k, dim=-1)
        else:
            i = given[lo:lo + chunk_size]
            v = logits.gather(-1, i)
        target = logits.gather(-1, targets[lo:lo + chunk_size, None]).squeeze(-1)
        lse = logsumexp_(logits)
        ids.append(i)
        vals.append(v - lse)
        sampled.append(target - lse.squeeze(-1))
        del logits, lse
    return torch.cat(ids).cpu(), torch.cat(vals).cpu(), torch.cat(sampled).cpu()


@register_teacher("hf")
class HFTeacher(Teacher):
    """A transformers AutoModelForCausalLM teacher. Options: device, attn_implementation, trust_remote_code."""

    OPTIONS = {"device": str, "attn_implementation": str, "trust_remote_code": bool}

    def __init__(self, name: str, cfg: TeacherConfig) -> None:
        super().__init__(name, cfg)
        check_options(type(self), name, cfg.options, ray_actor=False)
        self.device = pick_device(cfg.options.get("device"))
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        path = model_folder(cfg.model, f"teachers.{name}.model")
        trust = bool(cfg.options.get("trust_remote_code", False))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        # use_safetensors: weights from safetensors only, never the pickled .bin format.
        kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": trust, "use_safetensors": True}
        if "attn_implementation" in cfg.options:
            kwargs["attn_implementation"] = cfg.options["attn_implementation"]
        with load_progress(path):
            self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(self.device).eval()
        self.backbone = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        # The CausalLM forward we bypass may post-process logits (Gemma-2 style soft-capping): apply it here too.
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.vocab_size = int(self.lm_head.weight.shape[0])

    def vocab(self) -> dict[str, int]:
        return dict(self.tokenizer.get_vocab())

    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        return self._run(samples, k, None)

    def score(self, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        if len(ids) != len(samples):
            raise ValueError(f"teacher {self.name!r}: {len(ids)} id tensors for {len(samples)} samples")
        k = int(ids[0].shape[-1]) if ids else 1
        return self._run(samples, k, ids)

    def _run(self, samples: list[Sample], k: int, given: list[torch.Tensor] | None) -> list[TeacherTopK]:
        """Score every teacher sequence of every sample (templates.teacher_views) in token-budget batches, then
        concatenate each sample's rows in loss-position order."""
        views: list[TeacherView] = []
        owner: list[int] = []  # sample index of each view
        view_given: list[torch.Tensor] = []  # with `given`: each view's slice of its sample's (N, K) ids
        for i, s in enumerate(samples):
            sample_views = teacher_views(s, self.tokenizer, self.cfg.chat_template, self.cfg.system_prompt)
            views += sample_views
            owner += [i] * len(sample_views)
            if given is not None:
                view_given += list(given[i].split([len(v.positions) for v in sample_views]))
        out: list[TeacherTopK | None] = [None] * len(views)
        for batch in token_budget_batches([len(v.input_ids) for v in views], self.cfg.token_budget):
            batch_given = None if given is None else [view_given[i] for i in batch]
            for i, result in zip(batch, self._score_batch([views[i] for i in batch], k, batch_given)):
                out[i] = result
        per_sample: list[list[TeacherTopK]] = [[] for _ in samples]
        for i, result in zip(owner, out):
            per_sample[i].append(result)  # type: ignore[arg-type]
        return [parts[0] if len(parts) == 1 else _concat(parts, k) for parts in per_sample]

    @torch.inference_mode()
    def _score_batch(self, views: list[TeacherView], k: int, given: list[torch.Tensor] | None = None,
                     ) -> list[TeacherTopK]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(v.input_ids) for v in views)
        ids = torch.full((len(views), width), pad, dtype=torch.long)
        mask = torch.zeros((len(views), width), dtype=torch.long)
        for b, v in enumerate(views):
            ids[b, :len(v.input_ids)] = torch.tensor(v.input_ids)
            mask[b, :len(v.input_ids)] = 1
        rows = torch.tensor([b for b, v in enumerate(views) for _ in v.positions], dtype=torch.long)
        cols = torch.tensor([p for v in views for p in v.positions], dtype=torch.long)
        if rows.numel() == 0:
            return [_empty(k) for _ in views]
        hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               use_cache=False).last_hidden_state
        # Right padding keeps positions 0..len-1 of every row unpadded, so row (b, t-1) predicts token (b, t).
        picked = hidden[rows.to(self.device), (cols - 1).to(self.device)]
        del hidden
        top_ids, top_vals, sampled = topk_from_hidden(
            picked, self.lm_head, ids[rows, cols].to(self.device), k, self.cfg.chunk_size or CHUNK_SIZE, self.softcap,
            None if given is None else torch.cat(given).to(self.device))
        counts = [len(v.positions) for v in views]
        # clone: a split is a view of the batch storage, and pickling it (Ray) would ship the whole batch per sample.
        return [TeacherTopK(i.clone(), v.clone(), s.clone()) for i, v, s in
                zip(top_ids.split(counts), top_vals.split(counts), sampled.split(counts))]

    def close(self) -> None:
        self.__dict__.pop("model", None)
        self.__dict__.pop("backbone", None)
        self.__dict__.pop("lm_head", None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _concat(parts: list[TeacherTopK], k: int) -> TeacherTopK:
    """One sample's rows from its teacher sequences, in order (a sample without loss positions has none)."""
    if not parts:
        return _empty(k)
    return TeacherTopK(torch.cat([p.topk_ids for p in parts]), torch.cat([p.topk_logprobs for p in parts]),
                       torch.cat([p.sampled_logprobs for p in parts]))


def _empty(k: int) -> TeacherTopK:
    return TeacherTopK(torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), torch.zeros((0,)))
