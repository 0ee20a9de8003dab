"""Task -> teacher routing: each teacher named by the config's tasks is built once and checked against the student.

`TeacherRouter.from_config(cfg)` builds only the teachers some task uses (a teacher serving several tasks is loaded
once; `ray_actor: true` teachers run as Ray actors via teachers/actor.py), then compares each teacher's vocabulary
with the student's under its `vocab_mismatch` policy (teachers/vocab.py). `router.topk(task, samples, k)` returns
one `TeacherTopK` per sample (topk_ids/topk_logprobs (N, K), sampled_logprobs (N,)) with ids in *student* id space:
under "mask"/"map" the samples are translated to teacher ids first, the top-K ids translated back (unmapped slots =
UNMAPPED_ID), and `TeacherTopK.scored` marks False the rows whose student token the teacher lacks (the learner
drops them). The student's vocabulary comes from the caller (the trainer passes its tokenizer's). Calls are
serialised by one lock: the async pipeline asks from its rollout thread while the fidelity probe asks from the
learner's.
"""
from __future__ import annotations

import threading

import torch

from opd_agents.config import Config, TeacherConfig
from opd_agents.samples import Sample, TeacherTopK
from teachers.registry import Teacher, build_teacher
from teachers.vocab import VocabReport, check_vocab, mark_unscored, remap_topk, translate_sample


def build_one(name: str, cfg: TeacherConfig) -> Teacher:
    """The teacher in-process, or as a Ray actor client when cfg.ray_actor is set."""
    if cfg.ray_actor:
        from teachers.actor import RemoteTeacher

        return RemoteTeacher(name, cfg)
    return build_teacher(name, cfg)


class TeacherRouter:
    """Maps task name -> Teacher; several tasks may share one teacher object."""

    def __init__(self, teachers: dict[str, Teacher], routes: dict[str, str], reports: dict[str, VocabReport]) -> None:
        self.teachers = teachers
        self.routes = routes
        self.reports = reports
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config, student_vocab: dict[str, int]) -> TeacherRouter:
        """The teachers the tasks of `cfg` use (model paths already resolved to folders or hub ids), each checked
        against `student_vocab` (token string -> id)."""
        routes = {task.name: task.teacher for task in cfg.tasks}
        teachers: dict[str, Teacher] = {}
        reports: dict[str, VocabReport] = {}
        try:
            for name in dict.fromkeys(routes.values()):
                tcfg = cfg.teachers[name]
                teachers[name] = build_one(name, tcfg)
                reports[name] = check_vocab(student_vocab, teachers[name].vocab(), tcfg.vocab_mismatch, name)
        except BaseException:
            # Do not leak loaded models or actors when a later teacher fails to load or check.
            for teacher in teachers.values():
                teacher.close()
            raise
        return cls(teachers, routes, reports)

    @property
    def tasks(self) -> list[str]:
        return list(self.routes)

    def _teacher_name(self, task: str) -> str:
        if task not in self.routes:
            raise KeyError(f"no teacher for task {task!r}; tasks with a teacher: {self.tasks}")
        return self.routes[task]

    def __getitem__(self, task: str) -> Teacher:
        return self.teachers[self._teacher_name(task)]

    def vocab_report(self, task: str) -> VocabReport:
        return self.reports[self._teacher_name(task)]

    def topk(self, task: str, samples: list[Sample], k: int) -> list[TeacherTopK]:
        """The task's teacher top-K for `samples`, in student id space."""
        report = self.vocab_report(task)
        with self._lock:
            if report.identical:
                return self[task].topk(samples, k)
            answers = self[task].topk([translate_sample(s, report) for s in samples], k)
        return [mark_unscored(remap_topk(a, report), s, report) for a, s in zip(answers, samples)]

    def score(self, task: str, samples: list[Sample], ids: list[torch.Tensor]) -> list[TeacherTopK]:
        """The task's teacher log-probs at student-chosen ids (N, K) per sample (the student top-K support)."""
        if not self.vocab_report(task).identical:
            raise ValueError(f"task {task!r}: scoring student-chosen ids needs identical student and teacher "
                             "vocabularies; use loss.support=teacher_topk with vocab_mismatch: mask|map")
        with self._lock:
            return self[task].score(samples, ids)

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()
        self.teachers.clear()
