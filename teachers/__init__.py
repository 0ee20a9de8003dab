"""Teachers: task-routed models that return top-K next-token log-probs (TeacherTopK: (N, K) ids and log-probs).

Public names are loaded on first access, so `import teachers` stays light (no torch, transformers, Ray or vLLM).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Teacher": "teachers.registry",
    "register_teacher": "teachers.registry",
    "resolve_teacher_class": "teachers.registry",
    "build_teacher": "teachers.registry",
    "HFTeacher": "teachers.hf",
    "VLLMTeacher": "teachers.vllm_backend",
    "prompt_logprobs_to_topk": "teachers.vllm_backend",
    "TeacherActor": "teachers.actor",
    "RemoteTeacher": "teachers.actor",
    "TeacherError": "teachers.actor",
    "TeacherRouter": "teachers.router",
    "check_vocab": "teachers.vocab",
    "remap_topk": "teachers.vocab",
    "VocabReport": "teachers.vocab",
    "VocabMismatchError": "teachers.vocab",
    "UNMAPPED_ID": "teachers.vocab",
    "teacher_view": "teachers.templates",
    "TeacherView": "teachers.templates",
    "TemplateAlignmentError": "teachers.templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'teachers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
