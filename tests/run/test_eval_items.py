"""Evaluation subsets that represent the split (run/eval_items.py) and columns that name what was evaluated.

A sample below the split's size is stratified (ALFWorld: by task type, proportional to the official valid_seen
split's counts), seeded and the same on repeat; the evaluator plays the same ids for every policy and writes them;
`evaluate` without --checkpoint labels the config's student `student (before)`.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import gymnasium
import pytest
from rich.console import Console

import envs  # noqa: F401  (registers opd/*)
from opd_agents.config import TaskConfig
from opd_agents.run.eval_items import eval_item_ids, stratified_sample
from opd_agents.run.evaluation import Evaluator

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "alfworld"
needs_official_games = pytest.mark.skipif(
    not (DATA / "json_2.1.1" / "valid_seen").is_dir(),
    reason=f"official ALFWorld games not found at {DATA}/json_2.1.1/valid_seen (../shared beside the project)")


def _alfworld_task(n: int) -> TaskConfig:
    return TaskConfig(name="alfworld", env_id="opd/ALFWorld-v0", teacher="t", eval_episodes=n,
                      env_kwargs={"data_path": str(DATA), "expert": None}, eval_env_kwargs={"split": "valid_seen"})


def test_a_sample_is_proportional_to_each_stratum_seeded_and_repeatable() -> None:
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    ids = stratified_sample(strata, 10, seed=3)
    assert ids == sorted(set(ids)) and len(ids) == 10
    assert Counter(strata[i] for i in ids) == {"a": 5, "b": 3, "c": 2}
    assert stratified_sample(strata, 10, seed=3) == ids and stratified_sample(strata, 10, seed=4) != ids
    assert stratified_sample(strata, 100, seed=3) == list(range(100)) == stratified_sample(strata, 500, seed=3)


@needs_official_games
def test_the_official_split_is_sampled_by_task_type() -> None:
    env = gymnasium.make("opd/ALFWorld-v0", data_path=str(DATA), split="valid_seen", expert=None)
    strata = env.unwrapped.item_strata
    env.close()
    sizes = Counter(strata)
    assert len(strata) == 140 and len(sizes) == 6
    ids = eval_item_ids(_alfworld_task(30), seed=0)
    picked = Counter(strata[i] for i in ids)
    assert len(ids) == 30 and set(picked) == set(sizes)  # the first 30 games would be 2 of the 6 types
    for task_type, size in sizes.items():
        share = 30 * size / 140
        assert picked[task_type] in (math.floor(share), math.ceil(share)), (task_type, size, picked)
    assert eval_item_ids(_alfworld_task(30), seed=0) == ids and eval_item_ids(_alfworld_task(140), 0) == list(
        range(140))


def test_math_items_are_stratified_by_the_fields_their_rows_carry() -> None:
    env = gymnasium.make("opd/Math-v0", split="eval")
    strata = env.unwrapped.item_strata
    env.close()
    assert len(strata) == env.unwrapped.num_items and all(s.startswith("level ") for s in strata)


class _Group:
    """Records which items each evaluation plays; every episode a win with no breakdown."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    def evaluate_episodes(self, task, n, *, greedy, k, seed, items, progress=None):
        self.asked.append(list(items))
        episode = SimpleNamespace(success=True, info={}, num_turns=1)
        return SimpleNamespace(episodes=[episode] * (len(items) * k))


@needs_official_games
def test_every_policy_plays_the_same_items_and_their_ids_are_written(tmp_path: Path) -> None:
    evaluator = Evaluator.__new__(Evaluator)
    task = _alfworld_task(12)
    evaluator.cfg = SimpleNamespace(tasks=[task], run=SimpleNamespace(seed=0),
                                    eval=SimpleNamespace(greedy=True, samples_per_prompt=1))
    evaluator.run_dir = SimpleNamespace(root=tmp_path, eval_dir=tmp_path)
    evaluator.summary, evaluator.items, evaluator.item_ids, evaluator.names = {}, {}, {}, {}
    evaluator.console = Console(quiet=True)
    group = _Group()
    evaluator.run(group, step=0, label="before")
    evaluator.run(group, step=5, label="final")
    evaluator.evaluate_policy(group, [task])  # as the teacher reference does
    assert group.asked[0] == group.asked[1] == group.asked[2] == eval_item_ids(task, 0)
    assert json.loads((tmp_path / "step_5.json").read_text())["item_ids"] == {"alfworld": group.asked[0]}
    assert evaluator.write_summary()["item_ids"] == {"alfworld": group.asked[0]}


@pytest.mark.parametrize("checkpoint", [False, True])
def test_evaluate_names_the_policy_it_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], checkpoint: bool) -> None:
    import opd_agents.rollout.group as group_module
    import opd_agents.run.cluster as cluster
    import opd_agents.run.preflight as preflight
    from opd_agents.evaluate import main

    def evaluate_policy(self, group, tasks=None):
        self._last_items = {"math": [1, 0]}
        return {"math": {"success": 0.5, "episodes": 2.0}}

    monkeypatch.setattr(Evaluator, "evaluate_policy", evaluate_policy)
    monkeypatch.setattr(preflight, "preflight", lambda cfg: cfg)
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(group_module, "RolloutGroup", lambda *a, **k: SimpleNamespace(shutdown=lambda: None))
    argv = [str(ROOT / "configs" / "alternating.yaml"), "--out", str(tmp_path / "out")]
    if checkpoint:
        (tmp_path / "step_3").mkdir()
        (tmp_path / "step_3" / "config.json").write_text("{}")
        argv += ["--checkpoint", str(tmp_path / "step_3")]
    assert main(argv) == 0
    stored = json.loads((tmp_path / "out" / "eval.json").read_text())
    label, column = ("final", "checkpoint step_3") if checkpoint else ("before", "student (before)")
    assert stored["columns"] == {label: column} and set(stored) == {label, "columns", "item_ids"}
    out = capsys.readouterr().out
    assert column in out and ("student (after)" not in out)


def test_the_translated_action_rate_is_logged_per_response() -> None:
    from opd_agents.rollout.stats import rollout_metrics
    from opd_agents.run.evaluation import episode_rows, summarize

    def episode(translated: int | None, turns: int) -> SimpleNamespace:
        info = {} if translated is None else {"translated_actions": translated}
        return SimpleNamespace(success=True, reward=1.0, info=info, num_turns=turns, response_tokens=turns,
                               format_errors=0, truncated_responses=0, end_reason="done")

    episodes = [episode(1, 4), episode(0, 6)]
    assert rollout_metrics(episodes, 1.0)["rollout/translated_action_rate"] == pytest.approx(0.1)
    assert "rollout/translated_action_rate" not in rollout_metrics([episode(None, 3)], 1.0)  # e.g. math
    assert summarize(episode_rows(episodes, 1), 1)["translated_action_rate"] == pytest.approx(0.1)
