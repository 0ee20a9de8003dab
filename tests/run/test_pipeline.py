"""The async pipeline: its schedule keeps the staleness bound and makes resumes exact; the rollout side syncs the
versions the schedule names, hands errors over and never waits unbounded; with max_staleness 0 a real run equals the
sync run, and an async run resumed from a checkpoint equals an uninterrupted one."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from opd_agents.config import ConfigError, build_config
from opd_agents.run.pipeline import PipelineTimeout, Producer, StepBatch, barriers, rollout_versions
from opd_agents.run.preflight import loss_spec
from opd_agents.run.rundir import RunDir
from opd_agents.run.trainer import Trainer
from tests.run.test_train_e2e import _weights, tiny_run_data

# ---- the schedule -------------------------------------------------------------------------------------------------

def test_max_staleness_zero_is_the_sync_schedule_and_n_bounds_the_lag():
    assert rollout_versions(0, 10, 0, {0}) == {s: s - 1 for s in range(1, 11)}
    two = rollout_versions(0, 10, 2, {0})
    assert two == {1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6, 10: 7}
    assert all(0 <= s - 1 - v <= 2 for s, v in two.items())


def test_barriers_reset_the_lag_so_a_resume_from_a_checkpoint_sees_the_same_versions():
    every = barriers(0, 12, eval_every=0, save_every=4)
    assert every == {0, 4, 8, 12}
    full = rollout_versions(0, 12, 3, every)
    assert full == {1: 0, 2: 0, 3: 0, 4: 0, 5: 4, 6: 4, 7: 4, 8: 4, 9: 8, 10: 8, 11: 8, 12: 8}
    for c in (4, 8):  # resumed from checkpoint c: the start is a barrier, the versions after it are unchanged
        resumed = rollout_versions(c, 12, 3, barriers(c, 12, eval_every=0, save_every=4))
        assert resumed == {s: v for s, v in full.items() if s > c}
    assert rollout_versions(0, 6, 1, barriers(0, 6, eval_every=3, save_every=0))[4] == 3  # an evaluation step


# ---- the rollout side, with fake rollouts -------------------------------------------------------------------------

def _producer(versions, collect=None, timeout_s=5.0, synced=0):
    calls: list[tuple[str, int]] = []

    def sync(weights, version):
        assert weights["w"].item() == version  # the weights published for that version
        calls.append(("sync", version))

    def default_collect(step):
        calls.append(("collect", step))
        return StepBatch(step, {"math": 1})

    def score(batch):
        calls.append(("score", batch.step))
        return batch

    return Producer(versions, collect or default_collect, score, sync, timeout_s, synced), calls


def _weights_of(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(float(version))}


def test_the_rollout_side_syncs_each_scheduled_version_once_before_its_steps():
    versions = rollout_versions(0, 5, 1, {0})  # {1: 0, 2: 0, 3: 1, 4: 2, 5: 3}
    producer, calls = _producer(versions)
    producer.publish(0, None)  # the workers hold version 0
    producer.start()
    got = []
    for step in range(1, 6):
        batch = producer.batch(step)
        got.append((batch.step, batch.version))
        if producer.needs(step):
            producer.publish(step, _weights_of(step))
    producer.close()
    assert got == list(versions.items())
    rolled = [c for c in calls if c[0] != "score"]
    assert rolled == [("collect", 1), ("collect", 2), ("sync", 1), ("collect", 3), ("sync", 2), ("collect", 4),
                      ("sync", 3), ("collect", 5)]
    assert [c for c in calls if c[0] == "score"] == [("score", s) for s in range(1, 6)]
    assert all(calls.index(("collect", s)) < calls.index(("score", s)) for s in range(1, 6))
    assert not producer.needs(4) and not producer.needs(5)  # no later step rolls out with them


def test_at_most_n_plus_one_batches_exist_before_the_learner_takes_them():
    producer, calls = _producer(rollout_versions(0, 6, 2, {0}))
    producer.publish(0, None)
    producer.start()
    collected = lambda: [c for c in calls if c[0] == "collect"]  # noqa: E731
    deadline = time.monotonic() + 10
    while len(collected()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # no update published: the rollout side stops at the staleness bound
    assert collected() == [("collect", 1), ("collect", 2), ("collect", 3)]
    producer.close(wait_s=5)
    assert not producer.alive  # closed while waiting for weights


def test_an_error_on_the_rollout_side_reaches_the_learner_side():
    def collect(step):
        if step == 2:
            raise RuntimeError("env exploded")
        return StepBatch(step, {"math": 1})

    producer, _ = _producer(rollout_versions(0, 3, 1, {0}), collect)
    producer.publish(0, None)
    producer.start()
    assert producer.batch(1).step == 1
    with pytest.raises(RuntimeError, match="env exploded"):
        producer.batch(2)
    producer.close()


def test_an_error_in_the_teacher_stage_reaches_the_learner_side():
    def score(batch):
        raise ValueError("teacher actor died")

    producer = Producer(rollout_versions(0, 2, 0, {0}), lambda step: StepBatch(step, {"math": 1}), score,
                        lambda weights, version: None, 5.0, 0)
    producer.publish(0, None)
    producer.start()
    with pytest.raises(ValueError, match="teacher actor died"):
        producer.batch(1)
    producer.close(wait_s=5)
    assert not producer.alive


def test_every_wait_is_bounded_and_names_the_side_that_waited():
    blocked = threading.Event()

    def slow(step):
        blocked.wait(5)
        return StepBatch(step, {"math": 1})

    producer, _ = _producer(rollout_versions(0, 2, 0, {0}), slow, timeout_s=30.0)
    producer.publish(0, None)
    producer.start()
    with pytest.raises(PipelineTimeout, match="the learner waited 0.3 s"):
        producer.batch(1, timeout_s=0.3)
    blocked.set()
    assert producer.batch(1).step == 1  # it arrives later
    producer.close(wait_s=5)

    producer, _ = _producer(rollout_versions(0, 2, 0, {0}), timeout_s=0.3)  # step 2 needs version 1: never published
    producer.publish(0, None)
    producer.start()
    assert producer.batch(1).step == 1
    with pytest.raises(PipelineTimeout, match="the rollout side waited 0.3 s .* weights after update 1"):
        producer.batch(2, timeout_s=30.0)
    producer.close(wait_s=5)


def test_the_rollout_side_times_out_on_no_progress_not_on_a_long_wait():
    """Ahead of the learner it waits through several updates; each one the learner makes restarts its clock."""
    producer, _ = _producer(rollout_versions(0, 4, 2, {0}), timeout_s=1.5)  # {1: 0, 2: 0, 3: 0, 4: 1}
    producer.publish(0, None)
    producer.start()
    for step in (1, 2, 3):  # the roll-out thread waits for version 1 from the start
        assert producer.batch(step, timeout_s=10).step == step
        time.sleep(0.6)  # 1.8 s in all before version 1 exists, never 1.5 s without progress
    producer.publish(1, _weights_of(1))
    assert producer.batch(4, timeout_s=10).version == 1
    producer.close(wait_s=5)


def test_student_topk_support_cannot_run_async():
    data = {"student": {"path": "s"}, "teachers": {"t": {"model": "t"}},
            "tasks": [{"name": "a", "env_id": "opd/Math-v0", "teacher": "t"}]}
    cfg = build_config(data, ["loss.support=student_topk", "run.pipeline=async"])
    with pytest.raises(ConfigError, match="run.pipeline=sync, or loss.support=teacher_topk"):
        loss_spec(cfg)


# ---- real runs ----------------------------------------------------------------------------------------------------

def _run(tmp_path: Path, dirs, name: str, steps: int, resume: bool = False, **over) -> Path:
    cfg = build_config(tiny_run_data(tmp_path, dirs, name, steps), [f"{k}={v}" for k, v in over.items()])
    run_dir = RunDir.for_config(cfg)
    run_dir.create(cfg, resume=resume)
    Trainer(cfg, run_dir, resume=resume).fit()
    return tmp_path / name


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without wall times and the pipeline's own keys: what the schedule fixes."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items()
                    if not k.startswith(("time/", "pipeline/")) and not k.endswith(("_per_s", "time_s"))})
    return out


def test_async_with_staleness_zero_equals_the_sync_run(tmp_path, tiny_model_dirs):
    sync = _run(tmp_path, tiny_model_dirs, "sync", 3)
    pipe = _run(tmp_path, tiny_model_dirs, "async0", 3, **{"run.pipeline": "async", "run.max_staleness": 0})
    assert _records(pipe) == _records(sync)
    for key, value in _weights(sync, 3).items():
        assert torch.equal(_weights(pipe, 3)[key], value), key
    staleness = [json.loads(x).get("pipeline/staleness") for x in (pipe / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in staleness if s is not None] == [0, 0, 0]


@pytest.mark.slow  # three tiny runs
def test_an_async_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one(tmp_path, tiny_model_dirs):
    pipe = {"run.pipeline": "async", "run.max_staleness": 2, "run.save_every": 2}
    full = _run(tmp_path, tiny_model_dirs, "full", 4, **pipe)
    _run(tmp_path, tiny_model_dirs, "part", 2, **pipe)
    part = _run(tmp_path, tiny_model_dirs, "part", 4, resume=True, **pipe)
    # The same rollouts (the same tokens give the same rollout metrics) and updates; the optimizer state's round
    # trip through the checkpoint may round, as in the sync resume test.
    trained = [[r for r in _records(run) if "train/loss" in r] for run in (full, part)]
    assert len(trained[0]) == len(trained[1]) == 4
    for a, b in zip(*trained):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k, v in a.items()), a
    for key, value in _weights(full, 4).items():
        torch.testing.assert_close(_weights(part, 4)[key], value, rtol=1e-5, atol=1e-6)
    staleness = [json.loads(x).get("pipeline/staleness") for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in staleness if s is not None] == [0, 1, 0, 1]  # v = 0, 0, 2, 2: step 2 is a checkpoint


@pytest.mark.slow  # a tiny run with two evaluations
def test_an_evaluation_step_is_a_barrier_the_learner_side_syncs(tmp_path, tiny_model_dirs):
    over = {"run.pipeline": "async", "run.max_staleness": 1, "run.eval_every": 2, "run.save_every": 0,
            "run.eval_before": False}
    run = _run(tmp_path, tiny_model_dirs, "evals", 4, **over)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["pipeline/staleness"] for r in records if "pipeline/staleness" in r] == [0, 1, 0, 1]
    assert [r["step"] for r in records if "eval/math/success" in r] == [2, 4]  # step 2's, then the final one
    assert json.loads((run / "eval" / "step_2.json").read_text())["student"]["math"]["episodes"] == 2.0


def test_the_off_policy_correction_weighs_stale_samples_and_leaves_fresh_ones_at_one(tmp_path, tiny_model_dirs):
    over = {"run.pipeline": "async", "run.max_staleness": 1, "run.save_every": 0, "run.eval_every": 0,
            "loss.off_policy_correction": "truncate"}
    run = _run(tmp_path, tiny_model_dirs, "corrected", 3, **over)
    trained = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in trained if "train/loss" in r]
    assert [r["pipeline/staleness"] for r in trained] == [0, 1, 1]
    fresh, *stale = [r["train/offpolicy/log_ratio_abs_mean"] for r in trained]
    # Step 1 trains the weights that sampled it: the learner's recomputation differs from the rollout's only by
    # float rounding. Steps 2 and 3 were sampled one update earlier.
    assert fresh < 1e-4 and trained[0]["train/offpolicy/raw_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert all(s > 100 * max(fresh, 1e-7) for s in stale)
