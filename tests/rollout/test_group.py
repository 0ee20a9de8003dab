"""RolloutGroup on a real local Ray cluster: fan-out, weight sync and versions, worker death and restart."""
from __future__ import annotations

import threading
import time

import gymnasium
import pytest
import ray

import envs  # noqa: F401  (registers the opd/ environments)
from opd_agents.config import ModelConfig, RolloutConfig, TaskConfig
from opd_agents.rollout import RolloutGroup, RolloutWorkerError, SamplingParams, WeightVersionError
from opd_agents.rollout.request import RolloutRequest, training_specs
from tests.rollout.test_toyenv import ENV_ID, sharp_model

TOY = "tests.rollout.test_toyenv"
TASK = TaskConfig(name="guess", env_id=ENV_ID, teacher="t", max_new_tokens=6, max_turns=2)


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_model_dirs):
    rollout = RolloutConfig(num_workers=2, num_cpus_per_worker=1, max_concurrent_episodes=4, max_restarts=1)
    g = RolloutGroup(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, imports=[TOY], seed=0)
    yield g
    g.shutdown()


def test_rollout_fans_out_prompts_times_group_size(group):
    batch = group.rollout(TASK, num_prompts=3, group_size=2, seed=1)
    groups = [e.group_id for e in batch.episodes]
    assert len(groups) == 6 and len(set(groups)) == 3 and groups == sorted(groups, key=groups.index)
    assert all(s.metadata["weight_version"] == 0 and s.task == "guess" for s in batch.samples)
    assert batch.metrics["rollout/episodes"] == 6 and batch.metrics["rollout/worker_restarts"] == 0


def test_weight_sync_changes_outputs_and_is_version_checked(group, tiny_model_dirs):
    before = group.rollout(TASK, num_prompts=2, group_size=1, seed=3)
    group.sync_weights(sharp_model(tiny_model_dirs["student"]).state_dict(), version=1)
    assert group.version == 1 and ray.get([w.version.remote() for w in group.workers]) == [1, 1]
    after = group.rollout(TASK, num_prompts=2, group_size=1, seed=3)
    assert [s.input_ids for s in after.samples] != [s.input_ids for s in before.samples]
    assert all(s.metadata["weight_version"] == 1 for s in after.samples)
    stale = RolloutRequest(TASK, training_specs("guess", 1, 1, 0), SamplingParams(max_new_tokens=4), version=0, seed=0)
    with pytest.raises(WeightVersionError, match="sync_weights"):
        ray.get(group.workers[0].run.remote(stale))


def test_evaluation_progress_counts_episodes_as_they_finish_and_changes_nothing(group, tiny_model_dirs, monkeypatch):
    import opd_agents.rollout.group as group_module
    from opd_agents.rollout import LocalRolloutGroup

    monkeypatch.setattr(group_module, "POLL_S", 0.05)  # read the counter often, so partial counts show
    slow = TASK.model_copy(update={"name": "slow", "env_kwargs": {"step_delay": 0.1}})
    heard: list[tuple[int, int]] = []
    batch = group.evaluate_episodes(slow, 16, progress=lambda done, ok: heard.append((done, ok)))
    plain = group.evaluate_episodes(slow, 16)
    assert [e.success for e in batch.episodes] == [e.success for e in plain.episodes]
    assert heard[-1] == (16, sum(e.success for e in batch.episodes))
    # 4 in flight per worker: two waves, so some read falls between them
    assert [d for d, _ in heard] == sorted(d for d, _ in heard) and any(0 < d < 16 for d, _ in heard)
    local = LocalRolloutGroup(ModelConfig(path=str(tiny_model_dirs["student"])), RolloutConfig(), imports=[TOY])
    try:
        heard.clear()
        mine = local.evaluate_episodes(TASK, 3, progress=lambda done, ok: heard.append((done, ok)))
    finally:
        local.shutdown()
    assert [d for d, _ in heard] == [1, 2, 3, 3] and heard[-1][1] == sum(e.success for e in mine.episodes)


def test_actors_register_the_real_envs(group):
    if "opd/Math-v0" not in gymnasium.registry:
        pytest.skip("opd/Math-v0 is not registered by `import envs` yet")
    math = TaskConfig(name="math", env_id="opd/Math-v0", teacher="t", max_new_tokens=4, env_kwargs={"num_problems": 8})
    batch = group.rollout(math, num_prompts=2, group_size=1, seed=0)
    assert [e.end_reason for e in batch.episodes] == ["terminated"] * 2


def test_worker_killed_mid_request_is_restarted_and_nothing_is_lost(group):
    slow = TASK.model_copy(update={"name": "slow", "env_kwargs": {"step_delay": 0.15}})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(batch=group.rollout(slow, num_prompts=4, group_size=2,
                                                                               seed=2)))
    victim = group.workers[0]
    thread.start()
    time.sleep(0.5)  # each worker needs ≥ 2 rounds × 4 envs × 0.15 s: its request is in flight now
    ray.kill(victim)
    thread.join(timeout=120)
    batch = result["batch"]
    assert len(batch.episodes) == 8 and all(len(e.samples) == 1 for e in batch.episodes)
    assert batch.metrics["rollout/worker_restarts"] == 1
    assert group.workers[0] != victim
    # The replacement got the current weights before re-running the lost chunk.
    assert all(s.metadata["weight_version"] == group.version for s in batch.samples)


def test_workers_that_keep_dying_raise_a_clear_error(group):
    # Restart-and-rerun is covered above; with max_restarts = 0 the first death must already raise.
    group.rollout_cfg = group.rollout_cfg.model_copy(update={"max_restarts": 0})
    crashing = TASK.model_copy(update={"name": "crash", "env_kwargs": {"crash": True}})
    with pytest.raises(RolloutWorkerError, match="max_restarts"):
        group.rollout(crashing, num_prompts=2, group_size=1, seed=0)


def test_a_stuck_worker_is_killed_and_replaced_then_a_clear_error(group):
    # A hung env step never answers: past rollout.call_timeout_s the actor is killed and replaced (a counted
    # restart); when the replacement hangs too and the restarts run out, the error names the timeout.
    group.rollout_cfg = group.rollout_cfg.model_copy(update={"max_restarts": 1, "call_timeout_s": 3.0})
    stuck = TASK.model_copy(update={"name": "stuck", "env_kwargs": {"step_delay": 600.0}})
    started = time.monotonic()
    with pytest.raises(RolloutWorkerError, match="did not answer within rollout.call_timeout_s = 3 s"):
        group.rollout(stuck, num_prompts=1, group_size=1, seed=0)
    assert time.monotonic() - started < 90
    group.rollout_cfg = group.rollout_cfg.model_copy(update={"max_restarts": 1, "call_timeout_s": 1800.0})
    assert len(group.rollout(TASK, num_prompts=2, group_size=1, seed=0).episodes) == 2  # the group still works


def test_an_unschedulable_worker_is_a_clear_error_not_a_hang(ray_cluster, tiny_model_dirs):
    rollout = RolloutConfig(num_workers=1, num_cpus_per_worker=64, start_timeout_s=3.0)
    with pytest.raises(RolloutWorkerError, match=r"did not start within rollout.start_timeout_s = 3 s.*CPU"):
        RolloutGroup(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, imports=[TOY], seed=0)
