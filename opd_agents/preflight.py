"""Start-up checks that need more than the schema, run before the run directory is touched.

`config.load_config` validates types, keys and cross references. These checks open what the config points at:
model paths (local folders must exist; `zoo:` names must be zoo models), the student vocabulary against `loss.k`,
and every task's train and eval environment (constructed once and closed, so a missing data file or a bad env
kwarg fails here with the task's name, not inside a Ray actor mid-step).
"""
from __future__ import annotations

import json
from pathlib import Path

import gymnasium

from opd_agents.config import Config, ConfigError


def _is_local(path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, relative with dots, or home-relative."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def check_model_path(key: str, path: str) -> str | None:
    """The local folder for `path` (None for a hub id); a missing folder or unknown zoo name is a ConfigError."""
    if path.startswith("zoo:"):
        from opd_agents.zoo import ZOO_NAMES, resolve_model_path

        if path[4:] not in ZOO_NAMES:
            raise ConfigError(f"{key} = {path!r} is not an embedded zoo model; zoo models: "
                              f"{['zoo:' + n for n in ZOO_NAMES]}")
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


def check_envs(cfg: Config) -> None:
    for task in cfg.tasks:
        for label, kwargs in (("env_kwargs", task.env_kwargs), ("eval_env_kwargs", {**task.env_kwargs, **task.eval_env_kwargs})):
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


def preflight(cfg: Config) -> None:
    """Raise ConfigError on the first problem; nothing is written."""
    student = check_model_path("student.path", cfg.student.path)
    for name, teacher in cfg.teachers.items():
        if teacher.backend in ("hf", "vllm"):
            check_model_path(f"teachers.{name}.model", teacher.model)
    vocab = _vocab_size(student) if student else None
    if vocab is not None and cfg.loss.name != "full_reverse_kl" and cfg.loss.k > vocab:
        raise ConfigError(f"loss.k = {cfg.loss.k} is larger than the student vocabulary ({vocab} tokens); "
                          f"choose loss.k <= {vocab}")
    if cfg.loss.name == "topk_reverse_kl" and cfg.loss.support == "student_topk":
        from teachers.registry import Teacher, resolve_teacher_class

        for task in cfg.tasks:
            backend = resolve_teacher_class(cfg.teachers[task.teacher].backend)
            if backend.score is Teacher.score:
                raise ConfigError(f"loss.support = 'student_topk' needs teachers that score given token ids; "
                                  f"teachers.{task.teacher} uses backend {backend.__name__}, which cannot "
                                  "(use the hf backend, or loss.support=teacher_topk)")
    check_envs(cfg)
