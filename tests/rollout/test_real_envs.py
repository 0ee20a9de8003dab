"""Rollouts on the project's real environments (opd/Math-v0, opd/ALFWorld-v0) with the tiny student, in-process."""
from __future__ import annotations

import json

import pytest

import envs  # noqa: F401  (registers the opd/ environments)
from opd_agents.config import ModelConfig, RolloutConfig, TaskConfig
from opd_agents.rollout import ChatEncoder, LocalRolloutGroup


@pytest.fixture(scope="module")
def group(tiny_model_dirs):
    rollout = RolloutConfig(max_concurrent_episodes=4, prompts_per_step=2, group_size=2)
    return LocalRolloutGroup(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, seed=0)


@pytest.fixture(scope="module")
def alfworld_games(tmp_path_factory):
    from envs.alfworld.generate import main

    out = tmp_path_factory.mktemp("alfworld")
    assert main(["--out", str(out), "--n", "2", "--split", "train", "--split", "eval_in_distribution",
                 "--workers", "1"]) in (0, None)
    return out


def _check(batch, tokenizer, mode: str) -> None:
    enc = ChatEncoder(tokenizer)
    for ep in batch.episodes:
        assert len(ep.samples) == (ep.num_turns if mode == "per_turn" else 1)
        for s in ep.samples:
            replies = [m["content"] for m in s.messages if m["role"] == "assistant"]
            for (a, b), reply in zip(s.turn_spans, replies):
                assert tokenizer.decode(s.input_ids[a:b], skip_special_tokens=False) in (reply,
                                                                                         reply + tokenizer.eos_token)
            assert s.num_loss_tokens == sum(b - a for a, b in s.turn_spans) > 0
            json.dumps(s.metadata, allow_nan=False)  # metadata must stay JSON-serialisable
            if mode == "per_turn":
                assert s.input_ids[:s.turn_spans[0][0]] == enc.prompt_ids(s.messages[:-1])


def test_math_conversation_rollout_and_eval(group, tiny_tokenizer):
    task = TaskConfig(name="math", env_id="opd/Math-v0", teacher="t", max_new_tokens=8, max_turns=1,
                      env_kwargs={"num_problems": 20}, eval_env_kwargs={"split": "eval"})
    batch = group.rollout(task, seed=0)
    assert len(batch.episodes) == 4 and all(e.end_reason == "terminated" for e in batch.episodes)
    _check(batch, tiny_tokenizer, "conversation")
    by_group = {}
    for s in batch.samples:
        by_group.setdefault(s.group_id, set()).add(s.messages[-2]["content"])
    assert all(len(v) == 1 for v in by_group.values())  # the G rollouts of a prompt share it
    rows = group.evaluate(task, 2)
    assert [r["index"] for r in rows] == [0, 1] and all(r["success"] in (True, False) for r in rows)


def test_alfworld_per_turn_rollout_and_eval(group, tiny_tokenizer, alfworld_games):
    task = TaskConfig(name="alfworld", env_id="opd/ALFWorld-v0", teacher="t", max_new_tokens=8, max_turns=3,
                      sample_mode="per_turn", env_kwargs={"data_path": str(alfworld_games)},
                      eval_env_kwargs={"split": "eval_in_distribution"})
    batch = group.rollout(task, num_prompts=2, group_size=2, seed=0)
    assert [e.num_turns for e in batch.episodes] == [3] * 4 and len(batch.samples) == 12
    _check(batch, tiny_tokenizer, "per_turn")
    assert all(s.metadata["task_type"] for s in batch.samples)
    rows = group.evaluate(task, 2)
    assert len(rows) == 2 and all(r["task_type"] for r in rows)
    games = [e.info["game_path"] for e in group.evaluate_episodes(task, 2).episodes]
    assert len(set(games)) == 2 and all("eval_in_distribution" in g for g in games)  # distinct eval items
