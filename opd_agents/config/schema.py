"""The typed schema of a whole run: sections, fields, defaults, bounds and one- or two-line help texts.

YAML holds the values; this module holds the types (pydantic, `extra="forbid"`, no inf/NaN). Loading YAML and
overrides is `loading.py`, the error messages `errors.py`, credential redaction `redaction.py`; the field reference
is generated from here (`python -m opd_agents.config --markdown` -> docs/config.md) and the longer "why" of some
fields is in docs/configuration.md. Ground floor: imports nothing of the framework.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class _Section(BaseModel):
    # allow_inf_nan=False: an `inf` learning rate or a `.nan` clip validates as a float but breaks the run later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(_Section):
    name: str = Field("opd", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$",
                      description="Run name; the run directory is <output_dir>/<name>. Letters, digits and ._- "
                                  "only (no path separators), not starting with a dot.")
    output_dir: str = Field("runs", min_length=1, description="Parent folder of run directories.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for torch, python and numpy RNGs, env resets and "
                      "sampling (0 <= seed < 2**32).")
    steps: int = Field(100, ge=0,
                       description="Training steps (one rollout batch + its optimizer steps each). 0 = validate and "
                                   "set up only.")
    zoo_seed: int = Field(0, ge=0, le=10**6, description="Build seed of the embedded zoo that `zoo:<name>` paths "
                          "resolve to: 0 = the default build; another seed builds and uses an independent zoo.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0 = only before and after training).")
    eval_before: bool = Field(True, description="Evaluate the student before the first step.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1,
                           description="Checkpoints kept on disk (older ones are deleted after a new one is complete).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
                                                   description="Learner device: auto = CUDA if available, else CPU.")
    pipeline: Literal["sync", "async"] = Field(
        "sync", description="sync: roll out, score, train in turn. async: the next steps' rollouts and teacher "
        "answers are made while the learner trains, at most run.max_staleness updates behind (docs/pipeline.md).")
    max_staleness: int = Field(1, ge=0, le=1000, description="async: how many learner updates the weights that "
                               "generate a step's samples may lag (0 = the sync schedule, the same results); "
                               "evaluation and checkpoint steps are barriers.")
    pipeline_timeout_s: float = Field(21600.0, gt=0, allow_inf_nan=False, description="async: the longest either "
                                      "side waits for the other (a step's samples; a learner update with any "
                                      "evaluation and checkpoint), then an error naming it.")
    imports: list[str] = Field(default_factory=list,
                               description="Modules imported before validation, so user envs/teachers/losses "
                                           "register themselves (dotted module names).")

    @field_validator("output_dir")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain a NUL byte")
        return value

    @field_validator("imports")
    @classmethod
    def _module_names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not _MODULE.fullmatch(n)]
        if bad:
            raise ValueError(f"not dotted module names: {bad} (e.g. my_pkg.my_env)")
        return names


class ModelConfig(_Section):
    path: str = Field(..., description="Hub id, local folder, or `zoo:<name>` for the embedded tiny models.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype: auto = bfloat16 on CUDA, float32 on CPU. The learner keeps float32 master "
        "weights and optimizer state whatever this is.")
    trust_remote_code: bool = Field(False, description="Allow the model folder's own Python code (transformers "
                                    "trust_remote_code); only for models you trust.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")


class RolloutConfig(_Section):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Student generation engine: hf (transformers, CPU/GPU) or vllm (GPU).")
    num_workers: int = Field(1, ge=1, description="Rollout Ray actors (each holds a student replica and an env pool).")
    num_cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs per rollout actor (also its torch thread "
                                       "count on CPU).")
    num_gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per rollout actor (fractions share a GPU); "
                                       "0 = CPU.")
    max_concurrent_episodes: int | None = Field(
        None, ge=1, description="Episodes a rollout actor keeps in flight (an env each, one generate call for all "
        "live ones); null = all of its share of a request, so no request runs in waves.")
    prompts_per_step: int = Field(8, ge=1, description="Distinct prompts (env resets) per training step.")
    group_size: int = Field(4, ge=1, description="Rollouts per prompt (the paper's G).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (the teacher always "
                                "scores at temperature 1).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (paper default 0.9; 1.0 = unconstrained).")
    top_k: int = Field(0, ge=0, description="Top-k sampling cut (0 = off).")
    max_restarts: int = Field(
        3, ge=0, description="Times a dead or stuck rollout actor is replaced within one request.")
    start_timeout_s: float = Field(600.0, gt=0, description="Seconds a rollout actor may take to start (load its "
                                   "model); longer, or resources the cluster cannot grant, is a clear error.")
    call_timeout_s: float = Field(1800.0, gt=0, description="Seconds one rollout or weight-sync call of one actor may "
                                  "take; a stuck actor (e.g. a hung env step) is then replaced, counted as a restart.")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM(...) engine arguments.")
    weight_transfer: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="vLLM weight-transfer engine: gloo (host tensors over TCP, any platform), nccl (from the "
        "syncing process's GPU), auto = nccl when engines and that process have CUDA, else gloo.")


class TeacherConfig(_Section):
    backend: str = Field("hf", description="Registered teacher backend name, or a dotted path `pkg.mod:Class`.")
    model: str = Field(..., description="Hub id, local folder, or `zoo:<name>`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher weights' dtype: auto = bfloat16 on CUDA, float32 on CPU.")
    chat_template: str | None = Field(None,
                                      description="Teacher-side chat template; None = score the student's tokens as "
                                                  "they are.")
    system_prompt: str | None = Field(None,
                                      description="Replaces the system message when re-rendering for the teacher.")
    token_budget: int = Field(8192, ge=1, description="Tokens per teacher forward batch.")
    chunk_size: int | None = Field(None, ge=1, description="Positions per top-K chunk (bounds the (chunk, V) fp32 "
                                   "logits); None = the backend's default: hf 256 rows, vllm 1,024 tokens.")
    ray_actor: bool = Field(False, description="Run this teacher as its own Ray actor.")
    start_timeout_s: float = Field(1800.0, gt=0, description="Seconds this teacher's Ray actor may take to start "
                                   "(load its model): never killed for slowness before that.")
    call_timeout_s: float = Field(600.0, gt=0, description="Seconds one call of a started teacher actor may take; a "
                                  "stuck one is replaced and the call retried (options.ray_max_attempts).")
    call_tokens: int = Field(262_144, ge=1, description="Sample tokens per call of a Ray-actor teacher: a step's "
                             "samples go in calls of at most this many (a longer sample alone), each timed apart.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs of this teacher's actor (with ray_actor: true).")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs of this teacher's actor (with ray_actor: true).")
    vocab_mismatch: Literal["error", "mask", "map"] = Field(
        "error", description="Student/teacher vocabularies differ: error, mask the differing ids, or map them by "
                             "token string.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific keyword arguments.")


class TaskConfig(_Section):
    name: str = Field(..., description="Task name (keys metrics, the schedule and the teacher route).")
    env_id: str = Field(..., description="Gymnasium id, e.g. opd/Math-v0.")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="gymnasium.make kwargs for training envs.")
    eval_env_kwargs: dict[str, Any] = Field(default_factory=dict,
                                            description="Overrides of env_kwargs for evaluation envs.")
    teacher: str = Field(..., description="Name of an entry under `teachers`.")
    weight: float = Field(1.0, gt=0, description="Sampling weight for the `weighted` and `mixed` schedules.")
    prompts_per_step: int | None = Field(
        None, ge=1, description="Prompts on this task's steps (alternating/weighted schedules); None = "
                                "rollout.prompts_per_step. Lets a long multi-turn task take smaller steps than a "
                                "one-turn task.")
    max_new_tokens: int = Field(256, ge=1, description="Max tokens per model response.")
    max_turns: int = Field(1, ge=1, description="Max env steps per episode.")
    sample_mode: Literal["conversation", "per_turn"] = Field(
        "conversation", description="One sample per episode (env turns masked) or one per turn with history in the "
                                    "prompt.")
    eval_episodes: int = Field(32, ge=1, description="Evaluation episodes (distinct eval prompts).")
    lr_scale: float = Field(1.0, gt=0, description="Multiplier of optim.lr (and its schedule) on this task's steps: "
                            "tasks that learn at different rates share one optimizer. Needs one task per step "
                            "(alternating or weighted schedule).")


class ScheduleConfig(_Section):
    kind: Literal["alternating", "weighted", "mixed"] = Field(
        "alternating", description="alternating: one task per step, round-robin; weighted: one task per step drawn by "
                                   "weight; mixed: every step mixes tasks by weight.")


class LossConfig(_Section):
    # The loss and the support it compares at.
    name: str = Field("topk_reverse_kl", description="A registered loss: topk_reverse_kl (the paper's), "
                      "sampled_token_opd (baseline), full_reverse_kl (reference), or one from a run.imports module.")
    options: dict[str, Any] = Field(default_factory=dict, description="Hyper-parameters of a user-registered loss "
                                    "(read by that loss from lc.options); the built-in losses take none.")
    k: int = Field(32, ge=1, description="Support size K (K = 1 renormalised is a point mass: loss and gradient are "
                   "exactly 0, allowed for the paper's K ablation).")
    support: Literal["teacher_topk", "student_topk", "teacher_topk_union_sampled"] = Field(
        "teacher_topk", description="The ids compared at each position (the paper's Table 4): the teacher's top-K, "
        "the student's top-K (needs a teacher backend with `score`), or the teacher's top-K plus the sampled token.")
    renormalize: bool = Field(True,
                              description="Renormalise both models inside the support (off = the paper's ablation).")
    log_ratio_clip: float | None = Field(None, gt=0, description="Clamp |log p̂_S − log p̂_T| per support slot at "
                                         "this value (None = off); its active fraction is logged.")
    # sampled_token_opd only.
    old_logprob: Literal["recomputed", "rollout"] = Field(
        "recomputed", description="The old policy of the advantage and PPO ratio: the student's full-vocabulary "
        "log-prob recomputed before the update (the paper's code) or the rollout's top-p processed one.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip for sampled_token_opd.")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper PPO clip (DAPO's clip-higher); None = clip_eps.")
    clip_ratio_c: float | None = Field(3.0, gt=1, description="Dual-clip PPO: a token with a negative advantage loses "
                                       "at most clip_ratio_c · |A| (the paper's code: 3); None = off.")
    adv_clip: float | None = Field(None, gt=0, description="Clamp sampled_token_opd's advantage to ±adv_clip "
                                   "(None = off).")
    # Stale samples (run.pipeline: async).
    off_policy_correction: Literal["none", "truncate", "drop"] = Field(
        "none", description="Weights for stale samples (docs/pipeline.md): truncate = the history's likelihood "
        "ratio capped at importance_cap, drop = 0 outside [1/cap, cap], none = as on-policy.")
    importance_cap: float = Field(2.0, gt=1, le=1e6, description="The cap C of off_policy_correction (truncate at "
                                  "C; drop outside [1/C, C]); 1e6 is in effect no cap.")
    # Which tokens train, and how their losses combine.
    special_tokens: list[str] = Field(
        default_factory=list, description="Strings whose tokens are dropped from the loss (special-token mask).")
    special_token_mode: Literal["first", "all"] = Field(
        "first", description="Mask the first occurrence of each special_tokens sequence per sample, or every one.")
    entropy_top_ratio: float | None = Field(None, gt=0, le=1,
                                            description="Train only this top fraction of tokens by student entropy "
                                                        "(paper code: 0.2). None = all.")
    entropy_selection: Literal["per_sample", "pooled"] = Field(
        "per_sample", description="entropy_top_ratio per sample, max(1, ⌊ratio·n⌋) with ties kept (the paper's code), "
        "or pooled over the mini-batch, ⌈ratio·n⌉.")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = Field(
        "token_mean", description="How per-token losses become one: token_mean over the mini-batch's global token "
        "count, or per sequence (mean or sum over its tokens) then mean over sequences.")
    # How the learner computes the student's rows, and the diagnostics beside them.
    chunk_size: int = Field(1024, ge=1, description="Positions per chunk of student logits: bounds the (chunk, V) "
                            "block of the full path and the (chunk, H) LM-head rows of the support path.")
    student_logits: Literal["auto", "support", "full"] = Field(
        "auto", description="Student logits the loss computes: support (only the support's LM-head rows, exact for "
        "renormalised top-K), full (all V, chunked), or auto (support where exact).")
    diagnostic_positions: int | None = Field(
        256, ge=0, description="Support path: loss positions per micro-batch drawn (seeded) for the full-vocabulary "
        "diagnostics, each logged with its standard error; 0 = off, null = every position.")

    @field_validator("diagnostic_positions")
    @classmethod
    def _diagnostic_budget(cls, n: int | None) -> int | None:
        if n == 1:
            raise ValueError("1 position cannot state a standard error; use 0 (off), >= 2, or null (exact)")
        return n


class FidelityConfig(_Section):
    every: int = Field(0, ge=0, description="Probe every N steps (steps 1, 1 + N, ...; 0 = off): the loss's gradient "
                       "w.r.t. the student logits vs the exact full-vocabulary reverse-KL's.")
    positions: int = Field(256, ge=1, description="Loss positions per probe, from whole samples picked at random "
                           "(the teacher scores those samples with K = the vocabulary).")
    min_cosine: float = Field(0.0, ge=-1, le=1, description="A probe whose fidelity/cosine is at or below this "
                              "counts as failed.")
    patience: int = Field(3, ge=0, description="Stop the run after this many consecutive failed probes; 0 = only "
                          "log.")


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0, description="Peak AdamW learning rate (the paper: 1e-6 for 7B models).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")

    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, in optimizer steps.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate decay after warm-up, over all optimizer steps of the run.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay, as a fraction of lr.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    mini_batch_size: int = Field(0, ge=0, description="Episodes per optimizer step (a per-turn episode's samples count "
                                 "once, together); 0 = the whole rollout batch (one step).")
    micro_batch_tokens: int = Field(8192, ge=1,
                                    description="Token budget per forward/backward (gradient accumulation).")
    max_bad_steps: int = Field(3, ge=1, description="Consecutive non-finite updates tolerated before the run stops.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {betas}")
        return betas


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters (Qwen2/Llama projection names by default).")


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Learner ranks. 1 = in-process; N > 1 = N Ray actors in one "
                             "torch.distributed group (gloo on CPU, nccl on GPU).")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: replicated parameters, summed gradients; "
                                              "fsdp: parameters, gradients and optimizer state sharded (FSDP2).")
    replicas: int = Field(1, ge=1, description="fsdp only, HSDP: shard over num_workers / replicas ranks (a node) and "
                          "replicate across the replicas (nodes); 1 = shard over all ranks.")
    num_cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs per learner rank (num_workers > 1).")
    num_gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per learner rank (num_workers > 1).")
    placement: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the learner ranks (STRICT_PACK = one node).")
    gradient_checkpointing: bool | None = Field(None, description="Recompute each decoder layer in backward instead "
                                                "of keeping its activations; null = on for CUDA, off on CPU.")
    timeout_s: float = Field(1800.0, gt=0, description="Seconds a learner rank may take for one call (start-up, "
                             "an update, a collective); a dead or stuck rank then stops the run with a clear error.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters (peft) instead of all weights; rollout "
                                    "workers and exports get the merged weights. Needs pip install opd-agents[lora].")

    @model_validator(mode="after")
    def _replicas_divide_the_ranks(self) -> LearnerConfig:
        if self.replicas > 1 and (self.strategy != "fsdp" or self.num_workers % self.replicas):
            raise ValueError(f"replicas = {self.replicas} (HSDP) needs strategy: fsdp and num_workers a multiple of "
                             f"it (got strategy {self.strategy!r}, num_workers {self.num_workers})")
        return self


class EvalConfig(_Section):
    greedy: bool = Field(True, description="Greedy decoding for pass@1; False samples with the rollout settings.")
    samples_per_prompt: int = Field(1, ge=1, description="k for avg@k.")
    teacher_reference: bool = Field(True,
                                    description="Also evaluate each task's teacher as a policy (final eval only).")


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard events to <run dir>/tb.")
    wandb: bool = Field(False, description="Log to Weights & Biases (pip install opd-agents[wandb]).")
    wandb_project: str = Field("opd-agents", description="W&B project name.")
    progress: bool = Field(True, description="Rich progress display on the terminal.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; None starts a local cluster.")
    connect_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False,
                                     description="Seconds to wait for `ray.address` to answer before giving up.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (None = all).")
    malloc_mmap_threshold_kib: int | None = Field(
        1024, ge=0, le=32 * 1024, description="glibc's malloc mmap threshold (KiB) in the driver and every Ray "
        "worker: freed (rows, V) buffers return to the system. null = glibc's default.")


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig,
                           description="Run name, directory, seed, steps, eval and save cadence.")
    student: ModelConfig = Field(..., description="The student model (trained).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers and sampling.")
    teachers: dict[str, TeacherConfig] = Field(..., description="Teachers by name; tasks route to them.")
    tasks: list[TaskConfig] = Field(..., description="The environments trained on, each with its teacher.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Which task(s) each step trains on.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The distillation loss and its options.")
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig,
                                     description="The signal-fidelity probe: the loss's gradient vs the exact KL's.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer, schedule and batching.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner ranks, sharding and LoRA.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation decoding and the teacher reference.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig,
                                   description="TensorBoard, W&B and the terminal display.")
    ray: RayConfig = Field(default_factory=RayConfig, description="The Ray cluster to use or start.")

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        if not tasks:
            raise ValueError("at least one task is required")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {dup}")
        return tasks

    @model_validator(mode="after")
    def _teachers_exist(self) -> Config:
        for task in self.tasks:
            if task.teacher not in self.teachers:
                raise ValueError(
                    f"tasks[{task.name}].teacher = {task.teacher!r} is not defined under `teachers`; "
                    f"defined teachers: {sorted(self.teachers)}")
        return self

    @model_validator(mode="after")
    def _lr_scale_needs_one_task_per_step(self) -> Config:
        scaled = [t.name for t in self.tasks if t.lr_scale != 1.0]
        if scaled and self.schedule.kind == "mixed":
            raise ValueError(f"tasks {scaled} set lr_scale, which applies to steps of one task, but schedule.kind is "
                             "'mixed' (every step mixes tasks); use schedule.kind alternating or weighted, or drop "
                             "lr_scale")
        return self

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; tasks: {[t.name for t in self.tasks]}")
