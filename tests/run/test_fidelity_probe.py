"""The trainer's signal-fidelity hook: which samples it probes and asks the teacher for in full, the stop rule, and
one real tiny run that logs the probe and stops with a clear message when every probe fails."""
from __future__ import annotations

import pytest
import ray
import torch

from opd_agents.config import build_config
from opd_agents.run.fidelity import SignalFidelityError
from opd_agents.run.metrics import read_metrics
from opd_agents.run.rundir import RunDir
from opd_agents.run.trainer import Trainer
from opd_agents.samples import Sample, TeacherTopK
from tests.run.test_train_e2e import tiny_run_data


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _trainer(tmp_path, dirs, **over) -> Trainer:
    cfg = build_config(tiny_run_data(tmp_path, dirs, "probe", 2), [f"{k}={v}" for k, v in over.items()])
    return Trainer(cfg, RunDir.for_config(cfg))


def _sample(task: str, n: int) -> Sample:
    return Sample([1] * (n + 1), [0] + [1] * n, [0.0] + [-1.0] * n, task=task)


class _Router:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def topk(self, task, samples, k):
        self.calls.append((task, len(samples), k))
        return [TeacherTopK(torch.zeros(s.num_loss_tokens, k, dtype=torch.long), torch.zeros(s.num_loss_tokens, k),
                            torch.zeros(s.num_loss_tokens)) for s in samples]


class _Learner:
    vocab_size = 11

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def probe_fidelity(self, samples, teacher, teacher_full, seed):
        assert len(samples) == len(teacher) == len(teacher_full) and all(t.k == 11 for t in teacher_full)
        self.seen.append([id(s) for s in samples])
        return {"cosine": 0.5, "num_positions": float(sum(s.num_loss_tokens for s in samples))}


def test_probe_picks_random_whole_samples_until_the_budget_and_asks_each_task_in_full(tmp_path, tiny_model_dirs):
    trainer = _trainer(tmp_path, tiny_model_dirs, **{"fidelity.every": 1, "fidelity.positions": 25})
    samples = [_sample("math" if i % 2 else "other", 10) for i in range(8)]
    teacher = _Router().topk("x", samples, 8)
    router, learner = _Router(), _Learner()
    metrics = trainer.fidelity.probe(4, samples, teacher, router, learner)
    assert metrics == {"fidelity/cosine": 0.5, "fidelity/num_positions": 30.0}  # 3 samples reach 25 positions
    assert all(k == 11 for _, _, k in router.calls) and sum(n for _, n, _ in router.calls) == 3
    assert len({task for task, _, _ in router.calls}) == len(router.calls)  # one teacher call per task
    trainer.fidelity.probe(4, samples, teacher, _Router(), learner)
    trainer.fidelity.probe(5, samples, teacher, _Router(), learner)
    assert learner.seen[0] == learner.seen[1] != learner.seen[2]  # reproducible per step, drawn afresh each step


def test_stop_after_patience_consecutive_failed_probes(tmp_path, tiny_model_dirs):
    trainer = _trainer(tmp_path, tiny_model_dirs, **{"fidelity.patience": 2})
    trainer.fidelity.check({"train/loss": 1.0})  # no probe this step: nothing counted
    trainer.fidelity.check({"fidelity/cosine": -0.1})
    trainer.fidelity.check({"fidelity/cosine": 0.4})  # a good probe resets the count
    trainer.fidelity.check({"fidelity/cosine": 0.0})
    with pytest.raises(SignalFidelityError, match=r"cosine <= 0 .* at 2 consecutive probes.*fidelity.patience=0"):
        trainer.fidelity.check({"fidelity/cosine": -0.2, "fidelity/rel_norm": 0.1})
    patient = _trainer(tmp_path, tiny_model_dirs, **{"fidelity.patience": 0})
    for _ in range(5):
        patient.fidelity.check({"fidelity/cosine": -1.0})


def test_a_run_logs_the_probe_and_stops_when_it_keeps_failing(tmp_path, tiny_model_dirs):
    # Every probe fails against a cosine floor of 1 (the top-8 loss is not the full-vocabulary one).
    over = {"fidelity.every": 1, "fidelity.min_cosine": 1.0, "fidelity.patience": 2, "fidelity.positions": 8}
    trainer = _trainer(tmp_path, tiny_model_dirs, **over)
    trainer.run_dir.create(trainer.cfg, resume=False)
    with pytest.raises(SignalFidelityError, match="2 consecutive probes"):
        trainer.fit()
    records = [r for r in read_metrics(trainer.run_dir.root / "metrics.jsonl") if "fidelity/cosine" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert -1 <= r["fidelity/cosine"] < 1 and r["fidelity/num_positions"] >= 8 and "time/fidelity" in r
        assert r["fidelity/zero_grad_frac"] < 1 and r["train/entropy_se"] >= 0


def test_the_probe_leaves_training_as_it_was(tmp_path, tiny_model_dirs):
    # The shipped configs probe; a probe must not move what the run trains: same seeded run with and without it,
    # every logged value other than the probe's own and the timings bit-identical.
    def run(name: str, every: int) -> list[dict]:
        data = tiny_run_data(tmp_path / name, tiny_model_dirs, name, 2)
        cfg = build_config(data, [f"fidelity.every={every}", "fidelity.positions=8", "fidelity.patience=0"])
        trainer = Trainer(cfg, RunDir.for_config(cfg))
        trainer.run_dir.create(cfg, resume=False)
        trainer.fit()
        timing = ("_per_s", "time_s")  # rollout rates and seconds
        return [{k: v for k, v in r.items() if not k.startswith(("fidelity/", "time/")) and not k.endswith(timing)}
                for r in read_metrics(trainer.run_dir.root / "metrics.jsonl")]

    probed, plain = run("probed", 1), run("plain", 0)
    assert probed == plain and any("train/loss" in r for r in plain)
