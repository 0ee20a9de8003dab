"""Teacher registry: backend name (or dotted path) -> teacher class, and the `Teacher` interface.

A teacher answers `topk(samples, k)` with one `TeacherTopK` per sample (see opd_agents/samples.py):
for every loss position, the K most likely next tokens under the teacher and their log-probs
(temperature 1, normalised over the full vocabulary), plus the log-prob of the token the student sampled.

Users add a backend without editing the framework: decorate a class with `@register_teacher("name")` in a
module listed under `run.imports`, or name it by dotted path (`my_pkg.my_mod:MyTeacher`) in YAML.
"""
from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from opd_agents.config import TeacherConfig
    from opd_agents.samples import Sample, TeacherTopK

_REGISTRY: dict[str, type[Teacher]] = {}
_BUILTIN_MODULES = ("teachers.hf", "teachers.vllm_backend")


class Teacher(ABC):
    """Interface every backend implements. Constructed as `cls(name, cfg)` with cfg a TeacherConfig.

    `OPTIONS` declares the backend's `teachers.<name>.options` (name -> accepted type or types); start-up checks
    them with `check_options` before anything is loaded. None: the backend takes any options (checked by itself).
    """

    OPTIONS: dict[str, type | tuple[type, ...]] | None = None
    # Whether `topk(samples, k)` can answer k = the vocabulary: the signal-fidelity probe (`fidelity.every`) and
    # full-distribution losses ask for it. Start-up refuses those settings with a backend that cannot.
    FULL_DISTRIBUTION: bool = True

    def __init__(self, name: str, cfg: TeacherConfig) -> None:
        self.name = name
        self.cfg = cfg

    @abstractmethod
    def topk(self, samples: list[Sample], k: int) -> list[TeacherTopK]:
        """One TeacherTopK per sample, rows in loss-position order."""

    def score(self, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        """Log-probs at given token ids (N, K) per sample, as TeacherTopK with topk_ids = ids.

        Needed by `loss.support: student_topk`; backends that only expose their own top-K cannot offer it.
        """
        raise NotImplementedError(
            f"teacher backend {type(self).__name__} cannot score arbitrary token ids, which loss.support=student_topk "
            "needs; use the hf backend or another support")

    @classmethod
    def score_unavailable(cls, cfg: TeacherConfig) -> str | None:
        """Why this backend cannot `score` given ids with `cfg` (start-up refuses `loss.support: student_topk`
        then), or None when it can."""
        return None if cls.score is not Teacher.score else f"{cls.__name__} cannot score given token ids"

    @abstractmethod
    def vocab(self) -> dict[str, int]:
        """Token string -> id, for the start-up vocabulary check against the student."""

    def close(self) -> None:  # noqa: B027 — optional hook: a teacher holding nothing to release keeps this no-op
        """Release resources (GPU memory, engines). Idempotent."""


# Options of the Ray-actor client (teachers.actor), accepted by every backend when `ray_actor: true`.
CLIENT_OPTIONS: dict[str, tuple[type, ...]] = {"ray_max_attempts": (int,), "ray_backoff_s": (int, float)}
# Client options that became config fields: a config still using one fails naming its new place.
MOVED_OPTIONS = {"ray_timeout_s": "call_timeout_s (and start_timeout_s for the actor's start-up)"}


def _positive(key: str, value: float) -> bool:
    return value > 0 or (key == "ray_backoff_s" and value == 0)


def check_options(cls: type[Teacher], name: str, options: dict[str, Any], ray_actor: bool) -> None:
    """ValueError naming the key unless every option is declared by the backend (or the actor client) with a value
    of its type; client timeouts must be finite and positive."""
    declared: dict[str, Any] = dict(CLIENT_OPTIONS) if ray_actor else {}
    if cls.OPTIONS is None:
        options = {k: v for k, v in options.items() if k in declared}
    else:
        declared |= cls.OPTIONS
    for key, value in options.items():
        if key in MOVED_OPTIONS:
            raise ValueError(f"teachers.{name}.options.{key} moved to teachers.{name}.{MOVED_OPTIONS[key]}")
        if key not in declared:
            shown = repr(key) if len(key) <= 80 else f"{key[:80]!r}... ({len(key):,} characters)"
            raise ValueError(f"teachers.{name}.options: unknown key {shown} for backend {cls.__name__}; valid: "
                             f"{sorted(declared)}")
        kinds = declared[key] if isinstance(declared[key], tuple) else (declared[key],)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ValueError(f"teachers.{name}.options.{key} must be {' or '.join(k.__name__ for k in kinds)}, "
                             f"got {type(value).__name__}")
        if key in CLIENT_OPTIONS and not (math.isfinite(value) and _positive(key, value)):
            raise ValueError(f"teachers.{name}.options.{key} must be a finite positive number, got {value!r}")


def register_teacher(name: str) -> Callable[[type[Teacher]], type[Teacher]]:
    """Class decorator: make a Teacher subclass available as `backend: <name>` in YAML."""

    def wrap(cls: type[Teacher]) -> type[Teacher]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"teacher backend {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # Only a missing builtin module itself is tolerated; a missing dependency inside it is re-raised.
            if exc.name != mod:
                raise


def resolve_teacher_class(backend: str) -> type[Teacher]:
    """A registered name, or `pkg.mod:Class` / `pkg.mod.Class`."""
    if ":" in backend or ("." in backend and backend not in _REGISTRY):
        mod_name, attr = backend.split(":", 1) if ":" in backend else backend.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, Teacher)):
            raise TypeError(f"{backend!r} is not a subclass of teachers.registry.Teacher")
        return cls
    _load_builtins()
    if backend not in _REGISTRY:
        raise KeyError(f"unknown teacher backend {backend!r}; registered backends: {sorted(_REGISTRY)} "
                       f"(or give a dotted path `pkg.module:Class`)")
    return _REGISTRY[backend]


def build_teacher(name: str, cfg: TeacherConfig, **kwargs: Any) -> Teacher:
    return resolve_teacher_class(cfg.backend)(name, cfg, **kwargs)
