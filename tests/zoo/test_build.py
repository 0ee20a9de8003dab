"""The zoo build: demonstrations from the real envs, a miniature end-to-end build, the recipe version hash.

The real full build (minutes of CPU) is the ``slow`` test at the end.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.alfworld.generate import generate
from envs.math import grade
from opd_agents.zoo.build import (
    DEFAULT_RECIPE,
    _groups,
    build_version,
    ensure_zoo,
    miniature,
    with_build_seed,
)
from opd_agents.zoo.demos import alfworld_episodes, math_pairs
from opd_agents.zoo.models import TinySize
from opd_agents.zoo.paths import MANIFEST, ZOO_NAMES, is_complete
from opd_agents.zoo.sft import Pair, tokenize_pair
from opd_agents.zoo.tokenizer import train_tokenizer

MATH_ENV = dict(DEFAULT_RECIPE.math_env, num_problems=60)
# The zoo's prompt with the admissible commands listed, so a test can check each label against them.
LISTED = dict(DEFAULT_RECIPE.alfworld_env, adapter={**DEFAULT_RECIPE.alfworld_env["adapter"], "list_actions": True})


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    """Two train games and one in-distribution eval game, generated from the alfworld package's PDDL."""
    root = tmp_path_factory.mktemp("alfworld")
    made = generate(root, {"train": 2, "eval_in_distribution": 1}, seed=0, splits=("train", "eval_in_distribution"))
    assert len(made["train"]) == 2 and len(made["eval_in_distribution"]) == 1
    return root


def test_math_demonstrations_are_env_prompts_with_correct_solutions():
    pairs = math_pairs(MATH_ENV, limit=6)
    from opd_agents.zoo.demos import math_env

    env = math_env("train", MATH_ENV)
    adapter = env.prompt_adapter()
    for pair, problem in zip(pairs, env.problems):
        assert list(pair.messages) == adapter.initial_messages(problem["problem"], {})
        assert pair.response == problem["solution"] and grade(pair.response, problem["answer"])


def test_alfworld_demonstrations_are_admissible_actions_in_the_per_turn_format(games):
    env_kwargs = dict(LISTED, data_path=str(games))
    episodes = list(alfworld_episodes(env_kwargs))
    assert len(episodes) == 2 and all(episodes)
    tok = train_tokenizer([m["content"] for e in episodes for p in e for m in p.messages], vocab_size=400)
    for episode in episodes:
        for step, pair in enumerate(episode, start=1):
            prompt = pair.messages[-1]["content"]
            assert prompt.startswith("Task: ") and f"Now (step {step}): " in prompt
            action = re.fullmatch(r"<action>(.+)</action>", pair.response).group(1)
            assert action in prompt.split("\nActions: ")[1].split("\n")[0].split(" | ")
            assert tok.decode(tok.encode(pair.response)) == pair.response


def test_alfworld_replays_add_expert_labelled_states_off_the_expert_path(games):
    env_kwargs = dict(LISTED, data_path=str(games))
    clean = [p for e in alfworld_episodes(env_kwargs) for p in e]
    played = [p for e in alfworld_episodes(env_kwargs, replays=3, detour=0.5, seed=1) for p in e]
    assert played[0] == clean[0]  # each game's first play is the expert's own
    prompts = {p.messages[-1]["content"] for p in clean}
    assert {p.messages[-1]["content"] for p in played} - prompts, "detours must reach new states"
    for pair in played:
        action = re.fullmatch(r"<action>(.+)</action>", pair.response).group(1)
        assert action in pair.messages[-1]["content"].split("\nActions: ")[1].split("\n")[0].split(" | ")
    assert played == [p for e in alfworld_episodes(env_kwargs, replays=3, detour=0.5, seed=1) for p in e]


def test_parallel_demonstrations_equal_serial_ones(games):
    env_kwargs = dict(DEFAULT_RECIPE.alfworld_env, data_path=str(games))
    serial = alfworld_episodes(env_kwargs, replays=1, seed=2)
    assert alfworld_episodes(env_kwargs, replays=1, seed=2, workers=2) == serial and len(serial) >= 3


def test_build_groups_keep_chains_together_and_balance_time_budgets():
    spec = DEFAULT_RECIPE.models["student"]
    def timed(budget, init=None):
        return replace(spec, sft=replace(spec.sft, time_budget_s=budget), init_from=init)

    models = {"a": timed(100), "b": timed(300), "a2": timed(50, "a"), "c": timed(90), "a3": timed(10, "a2")}
    assert _groups(models, 2) == [["b"], ["a", "a2", "c", "a3"]]
    assert _groups(models, 1) == [list(models)] and len(_groups(models, 8)) == 3
    with pytest.raises(ValueError, match="must come earlier in the recipe"):
        _groups({"x": timed(1, "y"), "y": timed(1)}, 2)


def test_recipe_names_match_the_zoo_and_the_version_tracks_the_recipe():
    assert set(DEFAULT_RECIPE.models) | {"tokenizer"} == set(ZOO_NAMES)
    assert build_version() == build_version(DEFAULT_RECIPE)
    assert build_version(replace(DEFAULT_RECIPE, vocab_size=999)) != build_version()


def test_build_seed_moves_every_model_seed_and_nothing_else():
    seeded = with_build_seed(DEFAULT_RECIPE, 2)
    assert with_build_seed(DEFAULT_RECIPE, 0) == DEFAULT_RECIPE
    assert with_build_seed(seeded, 0) == DEFAULT_RECIPE and build_version(seeded) != build_version()
    for name, spec in DEFAULT_RECIPE.models.items():
        moved = seeded.models[name]
        assert (moved.seed, moved.sft.seed) == (spec.seed + 2000, spec.sft.seed + 2000)
        assert replace(moved, seed=spec.seed, sft=replace(moved.sft, seed=spec.sft.seed)) == spec
    assert replace(seeded, build_seed=0, models=DEFAULT_RECIPE.models) == DEFAULT_RECIPE
    with pytest.raises(ValueError, match="must be >= 0"):
        with_build_seed(DEFAULT_RECIPE, -1)


def test_miniature_build_gives_loadable_models_sharing_one_vocabulary(tmp_path, games):
    recipe = replace(
        miniature(DEFAULT_RECIPE, steps=2, budget_s=30, size=TinySize(1, 32, 2, 1, 64)),
        vocab_size=400, math_env=MATH_ENV, eval_math_problems=3, eval_alfworld_games=1,
        alfworld_env=dict(DEFAULT_RECIPE.alfworld_env, data_path=str(games), max_steps=2),
    )
    folder = ensure_zoo(out=tmp_path / "zoo", recipe=recipe)
    assert is_complete(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["env_kwargs"] == {"opd/Math-v0": recipe.math_env, "opd/ALFWorld-v0": recipe.alfworld_env}
    assert set(manifest["models"]) == set(recipe.models)
    assert manifest["build_seed"] == 0 and manifest["machine"]["threads_per_process"] == 1
    for name, entry in manifest["models"].items():
        assert entry["steps"] == 2 and not entry["budget_bound"] and set(entry["eval_success"]) <= {"math", "alfworld"}
        assert entry["weights_sha256"] == hashlib.sha256((folder / name / "model.safetensors").read_bytes()).hexdigest()
        assert all(0.0 <= s <= 1.0 for s in entry["eval_success"].values())
    assert set(manifest["models"]["student"]["eval_success"]) == {"math", "alfworld"}
    # the student's checkpoint is the one whose dev success is nearest the target (ties: the later)
    selection = manifest["models"]["student"]["selection"]
    dev = {int(step): success for step, success in selection["dev_success"].items()}
    assert set(dev) == {1, 2} and selection["dev_problems"] == 3
    target = recipe.models["student"].select.target
    assert selection["chosen_step"] == max(dev, key=lambda step: (-abs(dev[step] - target), step))
    assert manifest["models"]["math-teacher"]["selection"] is None
    vocab = AutoTokenizer.from_pretrained(folder / "tokenizer").get_vocab()
    for name in recipe.models:
        tokenizer = AutoTokenizer.from_pretrained(folder / name)
        model = AutoModelForCausalLM.from_pretrained(folder / name)
        assert tokenizer.get_vocab() == vocab and model.config.vocab_size == len(vocab) == manifest["vocab_size"]
        assert tokenizer.eos_token == "<|im_end|>" and model.config.num_hidden_layers == 1
        end = recipe.models[name].end_token
        assert model.generation_config.eos_token_id == (
            tokenizer.eos_token_id if end is None else [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end)])
    # the end-of-turn variant starts from the math teacher and learns to end its answers with its own token
    assert manifest["models"]["math-teacher-eot"]["init_from"] == "math-teacher"


def test_end_token_changes_only_the_last_label():
    tok = train_tokenizer(["put a mug in sink", "1 + 2"], vocab_size=300)
    pair = Pair(({"role": "user", "content": "1 + 2"},), "3")
    usual, eot = tokenize_pair(tok, pair), tokenize_pair(tok, pair, "<|endoftext|>")
    assert usual.input_ids[:-1] == eot.input_ids[:-1] and usual.labels[:-1] == eot.labels[:-1]
    assert (usual.labels[-1], eot.labels[-1]) == (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>"))


@pytest.mark.slow
def test_full_default_build_meets_its_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(tmp_path))
    manifest = json.loads((ensure_zoo() / MANIFEST).read_text())
    models = manifest["models"]
    assert manifest["build_seconds"] <= 600
    assert models["math-teacher"]["eval_success"]["math"] >= 0.8
    assert models["math-teacher-eot"]["eval_success"]["math"] >= 0.8
    assert models["alfworld-teacher"]["eval_success"]["alfworld"] >= 0.75  # 90 games (79-84% here)
    # The student's checkpoint is chosen by its dev math success, and the eval split agrees within its noise
    # (200 problems: one standard error ~3.5 points) ...
    student, selection = models["student"], models["student"]["selection"]
    chosen_dev = selection["dev_success"][str(selection["chosen_step"])]
    assert abs(chosen_dev - selection["target"]) <= 0.15  # checkpoints 50 steps apart: build seed 1 chose 57%
    assert abs(student["eval_success"]["math"] - chosen_dev) <= 0.12
    # ... it stays below both teachers, yet wins some games: OPD needs well-formed student turns to score.
    assert student["eval_success"]["math"] < models["math-teacher"]["eval_success"]["math"] - 0.3
    assert 0.05 <= student["eval_success"]["alfworld"] < models["alfworld-teacher"]["eval_success"]["alfworld"]


def test_alfworld_relabelled_pairs_ask_other_tasks_of_the_same_states(games):
    env_kwargs = dict(LISTED, data_path=str(games))
    plain = [p for e in alfworld_episodes(env_kwargs) for p in e]
    relabelled = [p for e in alfworld_episodes(env_kwargs, relabels=2, seed=3) for p in e]
    assert len(relabelled) > len(plain)
    tasks = {p.messages[-1]["content"].split("\n")[0] for p in plain}
    extra = [p for p in relabelled if p.messages[-1]["content"].split("\n")[0] not in tasks]
    assert extra, "relabelling must change the task line"
    for pair in extra:
        prompt = pair.messages[-1]["content"]
        action = re.fullmatch(r"<action>(.+)</action>", pair.response).group(1)
        assert action in prompt.split("\nActions: ")[1].split("\n")[0].split(" | ")


def test_decision_accuracy_counts_every_expert_decision_by_kind(games):
    from opd_agents.zoo.demos import alfworld_env, play_expert
    from opd_agents.zoo.models import build_tiny_model
    from opd_agents.zoo.scoring import alfworld_decision_accuracy, decision_kind

    env_kwargs = dict(DEFAULT_RECIPE.alfworld_env, data_path=str(games))
    env = alfworld_env("eval_in_distribution", env_kwargs)
    expert = play_expert(env, env.prompt_adapter(), 0)
    env.close()
    tok = train_tokenizer([m["content"] for p in expert for m in p.messages] + [p.response for p in expert],
                          vocab_size=400)
    counts = alfworld_decision_accuracy(build_tiny_model(tok, TinySize(1, 32, 2, 1, 64), seed=0), tok, env_kwargs, 1)
    assert counts["all"]["total"] == len(expert) == sum(c["total"] for k, c in counts.items() if k != "all")
    assert {decision_kind(p.response, p.messages[-1]["content"]) for p in expert} == set(counts) - {"all"}
    assert all(0 <= c["right"] <= c["total"] for c in counts.values())
    assert decision_kind("<action>go to desk 1</action>", "Task: x\nHolding: nothing\nUnvisited places for pen") \
        == "go-search"
    assert decision_kind("<action>go to desk 1</action>", "Task: x\nHolding: pen 1") == "go-target"
