"""Start-up checks that need more than the schema, and `zoo:` resolution — run before the run directory is touched.

`config.load_config` validates types and keys. `preflight(cfg)` then checks everything the config points at and
returns the config the run uses, with every `zoo:` model name resolved to its built folder (the zoo is built on
first use), so nothing downstream — rollout workers, teachers, the learner — ever sees a zoo name:
  - references: `run.imports` import, task env ids are registered Gymnasium ids, teacher backends and `loss.name`
    are registered (an unknown one lists the registered ones);
  - the loss: its spec's needs against `loss.student_logits`, `loss.support` and the teachers' backends;
  - model folders exist (local paths) or are zoo models; `loss.k` against the student's and every teacher's
    vocabulary — the one place `loss.k` is checked;
  - every task's train and eval environment is constructed once and closed, so a missing data file or a bad env
    kwarg fails here with the task's name, not inside a Ray actor mid-step.
Every failure is a `ConfigError` naming the key and the fix.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import gymnasium

from opd_agents.config import ZOO_PREFIX, Config, ConfigError
from opd_agents.learner.registry import LossSpec, get_loss
from teachers.registry import Teacher, resolve_teacher_class

# Backends whose `model` is a transformers model folder or hub id (checked and zoo-resolved here).
_MODEL_BACKENDS = ("hf", "vllm")


def check_references(cfg: Config) -> None:
    """User imports, env ids, teacher backends and the loss name, in that order (imports may register the rest)."""
    import envs  # noqa: F401  (registers the opd/ environments)

    for mod in cfg.run.imports:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(f"run.imports: cannot import {mod!r}: {exc}") from exc
    for task in cfg.tasks:
        if task.env_id not in gymnasium.registry:
            opd = sorted(k for k in gymnasium.registry if k.startswith("opd/"))
            raise ConfigError(
                f"tasks[{task.name}].env_id = {task.env_id!r} is not a registered Gymnasium id; "
                f"registered opd ids: {opd} (add the module that registers it to run.imports)")
    for name, teacher in cfg.teachers.items():
        try:
            resolve_teacher_class(teacher.backend)
        except (KeyError, ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"teachers.{name}.backend: {exc.args[0] if exc.args else exc}") from None
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
    if spec.teacher_query(lc) == "score":
        for task in cfg.tasks:
            backend = resolve_teacher_class(cfg.teachers[task.teacher].backend)
            if backend.score is Teacher.score:
                raise ConfigError(f"loss.support = {lc.support!r} needs teachers that score given token ids; "
                                  f"teachers.{task.teacher} uses backend {backend.__name__}, which cannot "
                                  "(use the hf backend, or loss.support=teacher_topk)")
    return spec


def _is_local(path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, relative with dots, or home-relative."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def check_model_path(key: str, path: str) -> str | None:
    """The local folder for `path` (None for a hub id); a missing folder or unknown zoo name is a ConfigError.
    A `zoo:` name is resolved (the zoo is built on first use)."""
    if path.startswith(ZOO_PREFIX):
        from opd_agents.zoo.paths import ZOO_NAMES
        from opd_agents.zoo.resolve import resolve_model_path

        if path[len(ZOO_PREFIX):] not in ZOO_NAMES:
            raise ConfigError(f"{key} = {path!r} is not an embedded zoo model; zoo models: "
                              f"{[ZOO_PREFIX + n for n in ZOO_NAMES]}")
        return resolve_model_path(path)
    if not _is_local(path):
        return None
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key} = {path!r}: no model folder there (expected a save_pretrained folder with "
                          "config.json); fix the path or use a hub id / `zoo:<name>`")
    return str(folder)


def _vocab_size(folder: str) -> int | None:
    config = json.loads((Path(folder) / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else None


def resolve_models(cfg: Config) -> Config:
    """`cfg` with the student's and the model-backed teachers' paths checked and `zoo:` names resolved to folders;
    `loss.k` checked against each local model's vocabulary."""
    student = check_model_path("student.path", cfg.student.path)
    teachers = {}
    folders = {"the student": student}
    for name, teacher in cfg.teachers.items():
        if teacher.backend in _MODEL_BACKENDS:
            folder = check_model_path(f"teachers.{name}.model", teacher.model)
            folders[f"teacher {name!r}"] = folder
            teacher = teacher.model_copy(update={"model": folder or teacher.model})
        teachers[name] = teacher
    if loss_spec(cfg).teacher_query(cfg.loss) != "full":
        for key, folder in folders.items():
            vocab = _vocab_size(folder) if folder else None
            if vocab is not None and cfg.loss.k > vocab:
                raise ConfigError(f"loss.k = {cfg.loss.k} is larger than {key}'s vocabulary ({vocab} tokens); "
                                  f"choose loss.k <= {vocab}")
    return cfg.model_copy(update={"student": cfg.student.model_copy(update={"path": student or cfg.student.path}),
                                  "teachers": teachers})


def check_envs(cfg: Config) -> None:
    for task in cfg.tasks:
        for label, kwargs in (("env_kwargs", task.env_kwargs), ("eval_env_kwargs", {**task.env_kwargs,
                                                                                    **task.eval_env_kwargs})):
            try:
                env = gymnasium.make(task.env_id, **kwargs)
            except Exception as exc:  # any failure to build the env is a config problem of this task
                raise ConfigError(f"tasks[{task.name}].{label}: cannot create {task.env_id} with {kwargs}: "
                                  f"{type(exc).__name__}: {exc}") from None
            # Envs that know their size (``num_items``) are checked against the eval items asked for.
            size = getattr(env.unwrapped, "num_items", None)
            env.close()
            if label == "eval_env_kwargs" and size is not None and task.eval_episodes > size:
                raise ConfigError(f"tasks[{task.name}].eval_episodes = {task.eval_episodes}, but the eval split "
                                  f"({kwargs}) has only {size} items; set tasks.{task.name}.eval_episodes <= {size}")


def preflight(cfg: Config) -> Config:
    """Raise ConfigError on the first problem (nothing is written); return `cfg` with its models resolved."""
    check_references(cfg)
    resolved = resolve_models(cfg)
    check_envs(resolved)
    return resolved
