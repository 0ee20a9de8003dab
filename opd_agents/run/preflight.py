"""Start-up checks that need more than the schema, and `zoo:` resolution — run before the run directory is touched.

`config.load_config` validates types and keys. `preflight(cfg)` then checks everything the config points at and
returns the config the run uses, with every `zoo:` model name resolved to its built folder (the zoo is built on
first use), so nothing downstream — rollout workers, teachers, the learner — ever sees a zoo name:
  - references: `run.imports` import (first in a bounded child process, `run/user_imports.py`), task env ids are
    registered Gymnasium ids, teacher backends and `loss.name` are registered (an unknown one lists the registered
    ones), teacher `options` are declared by their backend with values of the declared type;
  - the loss: its spec's needs against `loss.student_logits`, `loss.support` and the teachers' backends;
  - model folders exist (local paths) or are zoo models, their `config.json` is a JSON object whose size fits
    (`opd_agents/model_files.py`: not more parameters than this machine's memory holds, on a local cluster), their
    tokenizer loads, has no more tokens than the model's `vocab_size`, and has a chat template (or the config sets
    one); every chat template the run renders (the student's, each teacher's that renders) compiles and renders
    sample chats in a bounded child process (`opd_agents/chat_templates.py`); each local teacher's vocabulary
    against the student's under its `vocab_mismatch` policy (`error`: the differing tokens named); `loss.k` against
    the student's and every teacher's vocabulary — the one place `loss.k` is checked; every task's `max_new_tokens`
    against each model's context length;
  - resources: `run.device: cuda` needs CUDA; on a local Ray cluster (no `ray.address`) the CPUs and GPUs that the
    rollout actors, teacher actors and learner ranks ask for must exist, or Ray would wait for them forever; a
    `ray.address` must answer within `ray.connect_timeout_s`; on a machine with CUDA every GPU actor's estimated
    memory must fit (`memory_plan.py`);
  - every task's train and eval environment is constructed once and closed, so a missing data file or a bad env
    kwarg fails here with the task's name, not inside a Ray actor mid-step.
Every failure is a `ConfigError` naming the key and the fix.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gymnasium

from opd_agents.chat_templates import ChatTemplateError, tokenizer_variables, trial_render
from opd_agents.config import ZOO_PREFIX, Config, ConfigError, short_repr
from opd_agents.learner.registry import LossSpec, get_loss
from opd_agents.model_files import check_folder_files, check_model_size, check_tokenizer_fits, model_config
from opd_agents.run.cluster import check_address
from opd_agents.run.user_imports import import_user_modules
from teachers.registry import check_options, resolve_teacher_class

# Backends whose `model` is a transformers model folder or hub id (checked and zoo-resolved here).
_MODEL_BACKENDS = ("hf", "vllm")


def check_references(cfg: Config) -> None:
    """User imports, env ids, teacher backends and the loss name, in that order (imports may register the rest)."""
    import envs  # noqa: F401  (registers the opd/ environments)

    import_user_modules(cfg.run.imports)
    for task in cfg.tasks:
        if task.env_id not in gymnasium.registry:
            opd = sorted(k for k in gymnasium.registry if k.startswith("opd/"))
            raise ConfigError(
                f"tasks[{task.name}].env_id = {task.env_id!r} is not a registered Gymnasium id; "
                f"registered opd ids: {opd} (add the module that registers it to run.imports)")
    for name, teacher in cfg.teachers.items():
        try:
            backend = resolve_teacher_class(teacher.backend)
        except (KeyError, ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"teachers.{name}.backend: {exc.args[0] if exc.args else exc}") from None
        try:
            check_options(backend, name, teacher.options, teacher.ray_actor)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    loss_spec(cfg)


def loss_spec(cfg: Config) -> LossSpec:
    """The registered spec of `loss.name`, checked against the loss options that depend on it."""
    try:
        spec = get_loss(cfg.loss.name)
    except KeyError as exc:
        raise ConfigError(f"loss.name: {exc.args[0]}") from None
    lc = cfg.loss
    if lc.student_logits == "support" and spec.needs_full_logits(lc):
        raise ConfigError(f"loss.student_logits = 'support', but loss {lc.name!r} with these options needs the "
                          "full-vocabulary normaliser (e.g. renormalize = false); choose 'auto' or 'full'")
    full = {("the signal-fidelity probe (fidelity.every > 0)", "fidelity.every=0"): cfg.fidelity.every > 0,
            (f"loss {lc.name!r}", "a top-K loss"): spec.teacher_query(lc) == "full"}
    for why, instead in (key for key, asked in full.items() if asked):
        for task in cfg.tasks:
            backend = resolve_teacher_class(cfg.teachers[task.teacher].backend)
            if not backend.FULL_DISTRIBUTION:
                raise ConfigError(f"{why} asks each task's teacher for its full distribution; teachers.{task.teacher} "
                                  f"uses backend {backend.__name__}, which cannot serve it (use the hf backend for "
                                  f"that teacher, or {instead})")
    if spec.teacher_query(lc) == "score" and cfg.run.pipeline == "async":
        raise ConfigError(f"loss.support = {lc.support!r} asks the learner for the student's own top-K ids at every "
                          "step, which run.pipeline = 'async' cannot do while the learner trains: use "
                          "run.pipeline=sync, or loss.support=teacher_topk")
    if spec.teacher_query(lc) == "score":
        for task in cfg.tasks:
            teacher = cfg.teachers[task.teacher]
            backend = resolve_teacher_class(teacher.backend)
            reason = backend.score_unavailable(teacher)
            if reason is not None:
                raise ConfigError(f"loss.support = {lc.support!r} needs teachers that score given token ids; "
                                  f"teachers.{task.teacher} uses backend {backend.__name__}, which cannot here "
                                  f"({reason}): use backend: hf for that teacher, or loss.support=teacher_topk")
    return spec


def _is_local(path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, relative with dots, or home-relative."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def check_model_path(key: str, path: str, zoo_seed: int = 0) -> str | None:
    """The local folder for `path` (None for a hub id); a missing folder or unknown zoo name is a ConfigError.
    A `zoo:` name is resolved in the zoo of build seed `zoo_seed` (built on first use)."""
    if path.startswith(ZOO_PREFIX):
        from opd_agents.zoo.paths import ZOO_NAMES
        from opd_agents.zoo.resolve import resolve_model_path

        if path[len(ZOO_PREFIX):] not in ZOO_NAMES:
            raise ConfigError(f"{key} = {path!r} is not an embedded zoo model; zoo models: "
                              f"{[ZOO_PREFIX + n for n in ZOO_NAMES]}")
        return resolve_model_path(path, zoo_seed)
    if not _is_local(path):
        return None
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key} = {path!r}: no model folder there (expected a save_pretrained folder with "
                          "config.json); fix the path or use a hub id / `zoo:<name>`")
    return str(folder)


def _config_int(config: dict, name: str) -> int | None:
    value = config.get(name) or (config.get("text_config") or {}).get(name)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def check_tokenizer(key: str, folder: str, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    """The folder's tokenizer, loaded; it must render a chat (every prompt here is a chat template) unless the config
    gives `chat_template` for it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise ConfigError(f"{key}: cannot load the tokenizer in {folder} ({type(exc).__name__}: "
                          f"{short_repr(str(exc))}); save it beside the model with tokenizer.save_pretrained") from None
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        section = key.rsplit(".", 1)[0]
        raise ConfigError(f"{key}: the tokenizer in {folder} has no chat template (neither a chat_template.jinja file "
                          "nor a chat_template entry in tokenizer_config.json), and every prompt is rendered with "
                          f"one; use an instruct/chat tokenizer, save one with the tokenizer, or set "
                          f"{section}.chat_template")
    return tokenizer


def check_vocabularies(cfg: Config, vocabs: dict[str, dict[str, int]]) -> None:
    """Each local teacher's vocabulary against the student's under its `vocab_mismatch` policy (teachers/vocab.py):
    a mismatch under `error` is a ConfigError naming the differing tokens; under `mask`/`map` a note names them."""
    from teachers.vocab import VocabMismatchError, check_vocab

    student = vocabs.get("student.path")
    if student is None:
        return
    for name, teacher in cfg.teachers.items():
        vocab = vocabs.get(f"teachers.{name}.model")
        if vocab is None:
            continue
        try:
            report = check_vocab(student, vocab, teacher.vocab_mismatch, name)
        except VocabMismatchError as exc:
            raise ConfigError(f"teachers.{name}.model: {exc}") from None
        if not report.identical:
            shown = ", ".join(repr(t) for t in report.differing[:8])
            more = f" and {len(report.differing) - 8} more" if len(report.differing) > 8 else ""
            print(f"note: teachers.{name}: the student and teacher vocabularies differ in {len(report.differing)} "
                  f"tokens ({shown}{more}); vocab_mismatch: {teacher.vocab_mismatch} drops "
                  f"{len(report.masked_student_ids)} student ids from the loss and the teacher ids without a student "
                  "counterpart from the support", file=sys.stderr)


def check_models(cfg: Config, folders: dict[str, str | None]) -> None:
    """Per local model: config.json parses, the tokenizer loads (with a chat template, or one configured), `loss.k`
    fits its vocabulary and every task's `max_new_tokens` fits its context; then the teachers' vocabularies against
    the student's."""
    check_k = loss_spec(cfg).teacher_query(cfg.loss) != "full"
    vocabs: dict[str, dict[str, int]] = {}
    templates: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, folder in folders.items():
        if folder is None:
            continue
        check_folder_files(key, folder)
        config = model_config(key, folder)
        if key == "student.path":
            trust, template, dtype = cfg.student.trust_remote_code, cfg.student.chat_template, cfg.student.dtype
            renders = True
        else:
            teacher = cfg.teachers[key.split(".")[1]]
            trust, template = bool(teacher.options.get("trust_remote_code", False)), teacher.chat_template
            dtype = teacher.dtype
            # A teacher renders chats when it re-renders the student's (a template or system prompt of its own) or
            # plays the tasks as a policy (the teacher reference).
            renders = template is not None or teacher.system_prompt is not None or cfg.eval.teacher_reference
        check_model_size(key, config, dtype, local=cfg.ray.address is None)
        tokenizer = check_tokenizer(key, folder, trust, template)
        check_tokenizer_fits(key, tokenizer, config)
        vocabs[key] = tokenizer.get_vocab()
        if renders and (template is not None or getattr(tokenizer, "chat_template", None)):
            try:
                source = tokenizer.get_chat_template(template)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            templates[f"{key.rsplit('.', 1)[0]}.chat_template"] = (source, tokenizer_variables(tokenizer))
        vocab = _config_int(config, "vocab_size")
        if check_k and vocab is not None and cfg.loss.k > vocab:
            model = "the student" if key == "student.path" else f"teacher {key.split('.')[1]!r}"
            raise ConfigError(f"loss.k = {cfg.loss.k} is larger than {model}'s vocabulary ({vocab} tokens); "
                              f"choose loss.k <= {vocab}")
        context = _config_int(config, "max_position_embeddings")
        for task in cfg.tasks:
            if context is not None and task.max_new_tokens >= context:
                raise ConfigError(f"tasks[{task.name}].max_new_tokens = {task.max_new_tokens} does not fit {key}'s "
                                  f"context of {context} tokens (the prompt needs room too); choose a smaller value")
    check_vocabularies(cfg, vocabs)
    try:
        trial_render(templates)
    except ChatTemplateError as exc:
        raise ConfigError(f"{exc} (checked at start-up on sample chats)") from None


def resolve_models(cfg: Config) -> Config:
    """`cfg` with the student's and the model-backed teachers' paths checked and `zoo:` names resolved to folders;
    `loss.k` checked against each local model's vocabulary."""
    student = check_model_path("student.path", cfg.student.path, cfg.run.zoo_seed)
    teachers = {}
    folders = {"student.path": student}
    for name, teacher in cfg.teachers.items():
        if teacher.backend in _MODEL_BACKENDS:
            folder = check_model_path(f"teachers.{name}.model", teacher.model, cfg.run.zoo_seed)
            folders[f"teachers.{name}.model"] = folder
            teacher = teacher.model_copy(update={"model": folder or teacher.model})
        teachers[name] = teacher
    check_models(cfg, folders)
    return cfg.model_copy(update={"student": cfg.student.model_copy(update={"path": student or cfg.student.path}),
                                  "teachers": teachers})


def check_resources(cfg: Config) -> None:
    """What the run asks of the machine exists: CUDA for `run.device: cuda`, and, on a local Ray cluster, the CPUs
    and GPUs of the rollout actors, teacher actors and learner ranks (Ray would queue an impossible request forever;
    a remote cluster may autoscale, so it is left to the actors' start timeouts)."""
    import os

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.run.device == "cuda" and gpus == 0:
        raise ConfigError("run.device = 'cuda', but torch sees no CUDA device here; use run.device: auto or cpu, or "
                          "install a CUDA build of torch")
    if cfg.ray.address is not None:
        check_address(cfg.ray)
        return
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    asks = {"rollout": (cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker,
                        cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker)}
    actors = [t for t in cfg.teachers.values() if t.ray_actor]
    asks["teacher actors"] = (sum(t.num_cpus for t in actors), sum(t.num_gpus for t in actors))
    if cfg.learner.num_workers > 1:
        asks["learner ranks"] = (cfg.learner.num_workers * cfg.learner.num_cpus_per_worker,
                                 cfg.learner.num_workers * cfg.learner.num_gpus_per_worker)
    need_cpus = sum(c for c, _ in asks.values())
    need_gpus = sum(g for _, g in asks.values())
    detail = "; ".join(f"{k}: {c:g} CPUs, {g:g} GPUs" for k, (c, g) in asks.items())
    if need_cpus > cpus:
        raise ConfigError(f"the run asks the local Ray cluster for {need_cpus:g} CPUs ({detail}), but it has {cpus}; "
                          "lower rollout.num_workers / num_cpus_per_worker (or ray.num_cpus), or set ray.address "
                          "to a larger cluster")
    if need_gpus > gpus:
        raise ConfigError(f"the run asks the local Ray cluster for {need_gpus:g} GPUs ({detail}), but this machine "
                          f"has {gpus}; set the num_gpus* keys to 0 here, or set ray.address to a GPU cluster")


def check_envs(cfg: Config) -> None:
    for task in cfg.tasks:
        for label, kwargs in (("env_kwargs", task.env_kwargs), ("eval_env_kwargs", {**task.env_kwargs,
                                                                                    **task.eval_env_kwargs})):
            try:
                env = gymnasium.make(task.env_id, **kwargs)
            except Exception as exc:  # any failure to build the env is a config problem of this task
                raise ConfigError(f"tasks[{task.name}].{label}: cannot create {task.env_id} with "
                                  f"{short_repr(kwargs)}: {type(exc).__name__}: {short_repr(str(exc), 500)}") from None
            # Envs that know their size (``num_items``) are checked against the eval items asked for.
            size = getattr(env.unwrapped, "num_items", None)
            env.close()
            if label == "eval_env_kwargs" and size is not None and task.eval_episodes > size:
                raise ConfigError(f"tasks[{task.name}].eval_episodes = {task.eval_episodes}, but the eval split "
                                  f"({short_repr(kwargs)}) has only {size} items; "
                                  f"set tasks.{task.name}.eval_episodes <= {size}")


def check_memory(cfg: Config) -> None:
    """On a machine with CUDA, every GPU actor's estimated memory fits its share of a GPU of this machine's size
    (`run/memory_plan.py`); a config that cannot fit is one error naming the actor, its estimate and a layout that
    fits. `cfg` has its models resolved (their config.json is read)."""
    import torch

    from opd_agents.run.memory_plan import model_shapes, plan, uses_gpus

    if not (torch.cuda.is_available() and uses_gpus(cfg)):
        return
    result = plan(cfg, model_shapes(cfg), float(torch.cuda.get_device_properties(0).total_memory))
    if result.problems:
        raise ConfigError("the memory plan does not fit (python -m opd_agents.plan CONFIG prints it):\n  "
                          + "\n  ".join(result.problems))


def preflight(cfg: Config) -> Config:
    """Raise ConfigError on the first problem (nothing is written); return `cfg` with its models resolved."""
    check_references(cfg)
    check_resources(cfg)
    resolved = resolve_models(cfg)
    check_memory(resolved)
    check_envs(resolved)
    return resolved
