"""The GPU memory plan: each actor's GPU memory estimated from the config before anything starts.

Owns the estimate (`plan(cfg, shapes, gpu_bytes, gpus)` -> `MemoryPlan`), the verdict (`MemoryPlan.problems`: the
actors that cannot fit, each with its estimate, the GPU's size and a layout that fits) and the table that
`python -m opd_agents.plan` prints. Static terms are exact byte counts from the model shapes (parameters, float32
master weights, gradients and AdamW state, KV cache per token); activations follow a per-token model of the saved
tensors of a Qwen2/Llama-style decoder layer, fitted to and tested against `torch.autograd.graph.saved_tensors_hooks`
byte counts of tiny models (tests/run/test_memory_plan.py) and to the 7B rows of the GPU review. vLLM engines take
what `gpu_memory_utilization` reserves, plus the buffers vLLM keeps outside that budget.

Actors: the learner (one process on its GPU, or `learner.num_workers` ranks), each rollout worker (`hf` or `vllm`) and
each teacher (a Ray actor with `num_gpus`, or in the driver beside a one-process learner). An actor given a fraction
of a GPU must fit in that fraction of its usable memory (`USABLE`). GB in the table are 10^9 bytes, GiB 2^30.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_agents.config import Config, ConfigError

GB = 1e9
GIB = float(1 << 30)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_VLLM_UTILIZATION = 0.9  # vLLM's own default for gpu_memory_utilization
# Of a GPU's memory, what a PyTorch process can count on: the CUDA context (~0.5 GB) and the caching allocator's
# fragmentation take the rest. vLLM's gpu_memory_utilization is a fraction of the whole GPU, as vLLM computes it.
USABLE = 0.92
DEFAULT_VLLM_BATCHED_TOKENS = 1024  # the teacher backend's default chunk (teachers/vllm_backend.py)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model's `config.json` (Qwen2 / Llama layout: GQA attention, gated MLP)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    attention_bias: bool = True  # Qwen2: q/k/v biases

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a parsed `config.json` (keys as transformers writes them)."""
        heads = int(config["num_attention_heads"])
        return cls(layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                   intermediate=int(config["intermediate_size"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", False)),
                   attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        attention = 2 * h * h + 2 * h * kv + (h + 2 * kv if self.attention_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes


def layer_activation_bytes(shape: ModelShape, compute: int, residual: int) -> int:
    """Saved-for-backward bytes per token of one decoder layer: the compute-dtype tensors (q/k/v and attention output,
    the gated MLP's three intermediate tensors and its input, 6h + 4I + 2·kv_dim elements), the residual-dtype ones
    (the two RMSNorms' float32 inputs and their outputs: 8h bytes when the residual stream is in the compute dtype,
    18h under autocast with a float32 stream), and the per-head log-sum-exp and norm scales."""
    extra = 8 if residual == compute else 18
    return compute * (6 * shape.hidden + 4 * shape.intermediate + 2 * shape.kv_dim) + extra * shape.hidden \
        + 4 * shape.heads + 8


def forward_saved_bytes(shape: ModelShape, tokens: int, compute: int, residual: int, checkpointing: bool) -> int:
    """What a training forward keeps for backward: `activation_bytes` less, under checkpointing, the one layer's set
    that exists only while backward recomputes it (what `saved_tensors_hooks` or `memory_allocated` sees)."""
    recompute = tokens * layer_activation_bytes(shape, compute, residual) if checkpointing else 0
    return activation_bytes(shape, tokens, compute, residual, checkpointing) - recompute


def activation_bytes(shape: ModelShape, tokens: int, compute: int, residual: int, checkpointing: bool) -> int:
    """Peak saved-activation bytes of one forward + backward over `tokens` tokens (one micro-batch).

    Without checkpointing every layer's saved tensors at once; with it, each layer's input (in the residual dtype)
    plus one layer's full set while it is recomputed. Both add the final norm's (4 + residual)·h and, without
    checkpointing, the rotary cos/sin (2·head_dim in the residual dtype)."""
    final = (4 + residual) * shape.hidden + 12
    if checkpointing:
        per_token = shape.layers * residual * shape.hidden + layer_activation_bytes(shape, compute, residual) + final
    else:
        per_token = shape.layers * layer_activation_bytes(shape, compute, residual) + final \
            + 2 * shape.head_dim * residual
    return tokens * per_token


@dataclass
class ActorPlan:
    """One actor's estimate, per GPU it holds."""

    name: str
    count: int  # how many such actors
    gpus: float  # GPU share of each
    terms: dict[str, float] = field(default_factory=dict)  # bytes, by what holds them

    @property
    def total(self) -> float:
        return sum(self.terms.values())


@dataclass
class MemoryPlan:
    actors: list[ActorPlan]
    gpu_bytes: float
    gpus: int | None  # GPUs available, when known
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # memory no actor reserves (printed under the table)

    @property
    def gpus_needed(self) -> float:
        """GPUs the actors ask Ray for, plus the driver's one when a learner or teacher runs there."""
        driver = any("driver GPU" in a.name for a in self.actors)
        return sum(a.count * a.gpus for a in self.actors if "driver GPU" not in a.name) + (1 if driver else 0)

    def table(self) -> str:
        rows = [f"{'actor':<34} {'count':>5} {'GPUs':>5} {'GB each':>8}  {'fits':<4} breakdown (GB)"]
        shared = sum(a.total for a in self.actors if "driver GPU" in a.name)
        for a in self.actors:
            usable = USABLE * self.gpu_bytes
            fits = shared <= usable if "driver GPU" in a.name else a.total <= a.gpus * usable
            terms = ", ".join(f"{k} {v / GB:.1f}" for k, v in a.terms.items() if v >= 0.05 * GB)
            rows.append(f"{a.name:<34} {a.count:>5} {a.gpus:>5g} {a.total / GB:>8.1f}  {'yes' if fits else 'NO':<4} "
                        f"{terms}")
        have = f" of {self.gpus}" if self.gpus is not None else ""
        rows.append(f"GPUs needed: {self.gpus_needed:g}{have}, {self.gpu_bytes / GB:.1f} GB "
                    f"({self.gpu_bytes / GIB:.1f} GiB) each, {USABLE:.0%} of it counted as usable")
        return "\n".join(rows + self.notes)


def _bytes(dtype: str) -> int:
    """Bytes per element of a GPU actor's dtype (`auto` is bfloat16 on CUDA)."""
    return 2 if dtype == "auto" else _BYTES.get(dtype, 4)


def learner_terms(cfg: Config, shape: ModelShape, shards: int, max_tokens: int) -> dict[str, float]:
    """Bytes on one learner GPU: float32 masters, gradients and AdamW state (sharded by `shards` under fsdp), the
    compute-dtype copies each strategy keeps, the activations of the largest micro-batch, and the loss's buffers."""
    lc, compute = cfg.learner, _bytes(cfg.student.dtype)
    fsdp = lc.strategy == "fsdp" and lc.num_workers > 1
    p = shape.params
    if lc.lora is not None:  # a frozen base in the compute dtype; the adapters' state is small
        terms = {"weights (frozen base)": p * compute}
    else:
        n = shards if fsdp else 1
        terms = {"fp32 master weights": 4 * p / n, "fp32 grads": 4 * p / n, "AdamW state": 8 * p / n}
    if fsdp:
        # The loss module's parameters (embeddings, LM head) stay gathered from forward to backward, its float32
        # gradient is reduced whole, and a layer or two are gathered at a time.
        root = shape.embedding_params + shape.head_params
        terms["fsdp gathered root"] = root * compute
        terms["fsdp root grad fp32"] = 4 * (shape.head_params or shape.embedding_params)
        terms["fsdp layer gathers"] = 2 * shape.layer_params * compute
        residual = compute
    else:
        # Autocast keeps a compute-dtype copy of every linear weight for backward (none when it is float32).
        terms["autocast weight copies"] = shape.layers * shape.layer_params * compute if compute != 4 else 0
        residual = 4
    checkpointing = lc.gradient_checkpointing is not False  # null = on for CUDA
    terms["activations"] = activation_bytes(shape, max_tokens, compute, residual, checkpointing)
    full = cfg.loss.name != "topk_reverse_kl" or not cfg.loss.renormalize or cfg.loss.student_logits == "full"
    chunk = min(cfg.loss.chunk_size, max_tokens)
    terms["loss buffers"] = chunk * shape.vocab * (compute + 8) if full else \
        chunk * cfg.loss.k * shape.hidden * compute
    return terms


def vllm_terms(options: dict[str, Any], shape: ModelShape, gpu_bytes: float, teacher: bool) -> dict[str, float]:
    """A vLLM engine takes `gpu_memory_utilization` of the whole GPU (weights, KV cache, graphs inside it); a teacher
    also holds (batched tokens, V) float32 prompt log-prob buffers outside that budget."""
    utilization = float(options.get("gpu_memory_utilization", DEFAULT_VLLM_UTILIZATION))
    terms = {"vllm reserved": utilization * gpu_bytes}
    if teacher:
        tokens = int(options.get("max_num_batched_tokens", DEFAULT_VLLM_BATCHED_TOKENS))
        terms["prompt logprob buffers"] = 2.5 * tokens * shape.vocab * 4
    return terms


def hf_policy_terms(shape: ModelShape, dtype: str, sequences: int, max_tokens: int) -> dict[str, float]:
    compute = _bytes(dtype)
    return {"weights": shape.params * compute,
            "KV cache": sequences * max_tokens * shape.kv_bytes_per_token(compute),
            "logits": 2 * sequences * shape.vocab * 4}


def hf_teacher_terms(shape: ModelShape, dtype: str, token_budget: int, chunk: int) -> dict[str, float]:
    compute = _bytes(dtype)
    return {"weights": shape.params * compute,
            "forward": token_budget * (layer_activation_bytes(shape, compute, compute) + shape.hidden * compute),
            "top-K chunk": 2 * chunk * shape.vocab * 4}


# vLLM's packed NCCL broadcast (vllm/distributed/weight_transfer/packed_tensor.py, the trainer side's default):
# tensors are concatenated into chunks of this many bytes (a larger tensor is a chunk of its own), this many in flight.
VLLM_PACKED_BUFFER_BYTES = float(1 << 30)
VLLM_PACKED_BUFFERS = 2


def nccl_sync_staging(cfg: Config, shape: ModelShape) -> float:
    """Bytes the driver holds on its GPU while it sends the weights to vLLM engines over NCCL, 0 for any other sync.

    `weight_sync.StateDictSource` copies the tensors to the sending thread's GPU one at a time and vLLM packs them
    into chunks, `VLLM_PACKED_BUFFERS` in flight; the chunk being packed also holds its source copies. So at most
    (buffers + 1) chunks of max(buffer size, the largest tensor: the embedding or LM head, vocab × hidden in the
    compute dtype). `WorkerSenders` sends to one engine at a time over nccl, so this is the whole of it.
    """
    rc = cfg.rollout
    if rc.backend != "vllm" or rc.num_gpus_per_worker == 0 or rc.weight_transfer == "gloo":
        return 0.0
    largest = max(shape.vocab, shape.intermediate, shape.hidden) * shape.hidden * _bytes(cfg.student.dtype)
    return (VLLM_PACKED_BUFFERS + 1) * max(VLLM_PACKED_BUFFER_BYTES, float(largest))


def _episodes_in_flight(cfg: Config) -> int:
    """The most episodes one rollout worker generates for at once: `rollout.max_concurrent_episodes`, else its share
    of the largest request (a training step's prompts × group size, or an evaluation's episodes)."""
    rc = cfg.rollout
    largest = max(max((t.prompts_per_step or rc.prompts_per_step) * rc.group_size,
                      t.eval_episodes * cfg.eval.samples_per_prompt) for t in cfg.tasks)
    share = math.ceil(largest / rc.num_workers)
    return share if rc.max_concurrent_episodes is None else min(share, rc.max_concurrent_episodes)


def _max_tokens(cfg: Config) -> int:
    """The longest micro-batch a rank may see: the token budget, or a longer sample alone (its context length)."""
    context = int(cfg.rollout.vllm.get("max_model_len", 0) or 0)
    return max(cfg.optim.micro_batch_tokens, context)


def _fitting_learner(cfg: Config, shape: ModelShape, gpu_bytes: float, gpus: int | None) -> str:
    for n in (2, 3, 4, 6, 8, 16, 32, 64):
        if gpus is not None and n > gpus:
            break
        trial = cfg.model_copy(deep=True)
        trial.learner.num_workers, trial.learner.strategy = n, "fsdp"
        trial.learner.gradient_checkpointing = True
        total = sum(learner_terms(trial, shape, n, _max_tokens(cfg)).values())
        if total <= USABLE * gpu_bytes:
            return (f"learner: {{num_workers: {n}, strategy: fsdp, num_gpus_per_worker: 1, gradient_checkpointing: "
                    f"true}} (≈ {total / GB:.0f} GB per rank)")
    return "no FSDP layout of this model fits: lower optim.micro_batch_tokens, use learner.lora, or larger GPUs"


def plan(cfg: Config, shapes: dict[str, ModelShape], gpu_bytes: float, gpus: int | None = None) -> MemoryPlan:
    """The memory plan of `cfg` on GPUs of `gpu_bytes` (`gpus` of them, when known).

    `shapes`: "student" and each teacher's name -> its `ModelShape`. Actors on the CPU (no GPU share) are left out; a
    one-process learner and the teachers that run in the driver (`ray_actor: false`) share the driver's GPU.
    """
    actors: list[ActorPlan] = []
    student = shapes["student"]
    lc, rc = cfg.learner, cfg.rollout
    driver_gpu = lc.num_workers == 1 and cfg.run.device != "cpu"
    if lc.num_workers > 1 and lc.num_gpus_per_worker > 0:
        shards = lc.num_workers // lc.replicas if lc.strategy == "fsdp" else 1
        kind = f"hsdp {lc.replicas}×{shards}" if lc.replicas > 1 else f"{lc.strategy} ×{lc.num_workers}"
        actors.append(ActorPlan(f"learner rank ({kind})", lc.num_workers,
                                lc.num_gpus_per_worker, learner_terms(cfg, student, shards, _max_tokens(cfg))))
    elif driver_gpu:
        actors.append(ActorPlan("learner (one process, driver GPU)", 1, 1.0,
                                learner_terms(cfg, student, 1, _max_tokens(cfg))))
    if rc.num_gpus_per_worker > 0:
        if rc.backend == "vllm":
            terms = vllm_terms(rc.vllm, student, gpu_bytes, teacher=False)
        else:
            longest = max(t.max_new_tokens for t in cfg.tasks) + _max_tokens(cfg)
            terms = hf_policy_terms(student, cfg.student.dtype, _episodes_in_flight(cfg), longest)
        actors.append(ActorPlan(f"rollout worker ({rc.backend})", rc.num_workers, rc.num_gpus_per_worker, terms))
    for name, tc in cfg.teachers.items():
        in_driver = not tc.ray_actor and driver_gpu
        if name not in shapes or not (in_driver or (tc.ray_actor and tc.num_gpus > 0)):
            continue
        if tc.backend == "vllm":
            terms = vllm_terms(tc.options, shapes[name], gpu_bytes, teacher=True)
        else:
            terms = hf_teacher_terms(shapes[name], tc.dtype, tc.token_budget, tc.chunk_size or 256)
        where = "in the driver, driver GPU" if in_driver else tc.backend
        actors.append(ActorPlan(f"teacher {name} ({where})", 1, 0.0 if in_driver else tc.num_gpus, terms))
    notes: list[str] = []
    problems = _vllm_room(cfg, shapes, gpu_bytes)
    staging = nccl_sync_staging(cfg, student)
    on_driver = [a for a in actors if "driver GPU" in a.name]
    if staging and driver_gpu:
        on_driver[0].terms["nccl weight-sync staging"] = staging
    elif staging:
        # No GPU is reserved for the driver here: it stages on the CUDA device it sees first (GPU 0 of its node),
        # beside whichever actor Ray put there; the plan checks it beside the fullest GPU.
        fullest = max((a for a in actors if a.gpus > 0), key=lambda a: a.total / a.gpus)
        beside = fullest.total / fullest.gpus
        fits = beside + staging <= USABLE * gpu_bytes
        notes.append(f"driver (nccl weight sync): ≈ {staging / GB:.1f} GB staged on its GPU 0, no GPU reserved for "
                     f"it; beside the fullest GPU ({fullest.name}, {beside / GB:.1f} GB): "
                     + ("fits" if fits else "does NOT fit"))
        if not fits:
            problems.append(f"the driver's nccl weight sync stages ≈ {staging / GB:.1f} GB on its GPU 0, which may "
                            f"hold {fullest.name} ({beside / GB:.1f} GB): {USABLE * gpu_bytes / GB:.1f} GB usable; "
                            "set rollout.weight_transfer=gloo (host tensors, no GPU staging) or lower that actor's "
                            "memory")
    for a in actors:
        if a not in on_driver and a.total > a.gpus * USABLE * gpu_bytes:
            problems.append(_problem(cfg, a, a.gpus * USABLE * gpu_bytes, student, gpu_bytes, gpus))
    shared = sum(a.total for a in on_driver)
    if shared > USABLE * gpu_bytes:
        names = " + ".join(a.name.split(" (")[0] for a in on_driver)
        problems.append(f"the driver's GPU holds {names}: ≈ {shared / GB:.1f} GB against "
                        f"{USABLE * gpu_bytes / GB:.1f} GB usable; a "
                        "layout that fits: " + ("teachers as Ray actors (teachers.<name>.ray_actor: true, num_gpus: "
                                                "1) and " if len(on_driver) > 1 else "")
                        + _fitting_learner(cfg, student, gpu_bytes, gpus))
    result = MemoryPlan(actors, gpu_bytes, gpus, problems, notes)
    if gpus is not None and math.ceil(result.gpus_needed - 1e-9) > gpus:
        problems.append(f"the actors ask for {result.gpus_needed:g} GPUs but {gpus} are available: lower "
                        "rollout.num_workers, learner.num_workers or the teachers' num_gpus (two vLLM teachers share "
                        "one GPU with num_gpus: 0.5 and gpu_memory_utilization ≤ 0.45 each)")
    return result


def _vllm_room(cfg: Config, shapes: dict[str, ModelShape], gpu_bytes: float) -> list[str]:
    """vLLM engines whose reserved memory cannot hold their weights and the KV cache of one `max_model_len` sequence
    (vLLM would refuse to start)."""
    engines = [("rollout.vllm", cfg.rollout.vllm, shapes["student"], cfg.student.dtype)] \
        if cfg.rollout.backend == "vllm" and cfg.rollout.num_gpus_per_worker > 0 else []
    engines += [(f"teachers.{n}.options", t.options, shapes[n], t.dtype) for n, t in cfg.teachers.items()
                if t.backend == "vllm" and n in shapes and t.num_gpus > 0]
    out = []
    for key, options, shape, dtype in engines:
        reserved = float(options.get("gpu_memory_utilization", DEFAULT_VLLM_UTILIZATION)) * gpu_bytes
        tokens = int(options.get("max_model_len", 0) or 0)
        need = shape.params * _bytes(dtype) + tokens * shape.kv_bytes_per_token(_bytes(dtype))
        if need > reserved:
            out.append(f"{key}: gpu_memory_utilization reserves {reserved / GB:.1f} GB, less than the weights and one "
                       f"{tokens}-token sequence's KV cache ({need / GB:.1f} GB); raise gpu_memory_utilization or "
                       "lower max_model_len")
    return out


def _problem(cfg: Config, actor: ActorPlan, budget: float, student: ModelShape, gpu_bytes: float,
             gpus: int | None) -> str:
    head = (f"{actor.name} needs ≈ {actor.total / GB:.1f} GB but its GPU share holds {budget / GB:.1f} GB "
            f"({actor.gpus:g} × {USABLE:.0%} of {gpu_bytes / GB:.1f} GB); ")
    if actor.name.startswith("learner"):
        return head + "a layout that fits: " + _fitting_learner(cfg, student, gpu_bytes, gpus)
    if "vllm" in actor.name:
        return head + ("lower gpu_memory_utilization (and max_num_batched_tokens for a teacher), or give the engine a "
                       "whole GPU")
    return head + "give it a whole GPU (num_gpus: 1), or a smaller dtype / token_budget / max_concurrent_episodes"


def uses_gpus(cfg: Config) -> bool:
    """Whether any actor of `cfg` asks for a GPU (a one-process learner on `run.device: cuda` included)."""
    lc = cfg.learner
    return (cfg.run.device == "cuda" or (lc.num_workers > 1 and lc.num_gpus_per_worker > 0)
            or cfg.rollout.num_gpus_per_worker > 0 or any(t.num_gpus > 0 for t in cfg.teachers.values()))


def read_shape(key: str, path: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model at `path`: its `config.json` in a local folder, else transformers' `AutoConfig` (a hub
    id: from the local cache, or downloaded where the hub is reachable)."""
    # Imported here: the user-file layer lives in the envs package (gymnasium), which the GPU check's machine lacks.
    from opd_agents.model_files import model_config

    try:
        if Path(path).is_dir():  # through the user-file layer: a regular, bounded config.json holding an object
            config = model_config(key, path)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
        config = config.get("text_config", config)
        return ModelShape.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key} = {path!r}: cannot read its model config for the memory plan ({exc}); pass a local "
                          "model folder, or make the hub reachable") from None


def model_shapes(cfg: Config) -> dict[str, ModelShape]:
    """"student" and every teacher whose backend loads a transformers model -> its shape."""
    shapes = {"student": read_shape("student.path", cfg.student.path, cfg.student.trust_remote_code)}
    for name, tc in cfg.teachers.items():
        if tc.backend in ("hf", "vllm"):
            shapes[name] = read_shape(f"teachers.{name}.model", tc.model)
    return shapes
