"""One command vocabulary whatever the ALFWorld data's vintage (envs/alfworld/vocabulary.py).

On the official json_2.1.1 games in ``../shared`` (released before alfworld 0.4: ``put X in/on Y``, "You arrive at
loc N"): the default converts them at load so the expert wins through alfworld >= 0.4's commands, the native
option keeps the file's text, near-miss placing commands are played when exactly one admissible command matches,
the memory aid and its expert work on both vocabularies, and the user's file is never written.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from envs.adapter import Turn
from envs.alfworld.env import ALFWorldEnv
from envs.alfworld.expert import memory_expert
from envs.alfworld.memory import recall
from envs.alfworld.vocabulary import (
    convert_game,
    is_old_vintage,
    place_command,
    placing_pairs,
    translate_placing,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "alfworld"
needs_official_games = pytest.mark.skipif(
    not (DATA / "json_2.1.1" / "valid_seen").is_dir(),
    reason=f"official ALFWorld games not found at {DATA}/json_2.1.1/valid_seen (../shared beside the project)")
TASK_TYPE = "pick_and_place_simple"  # the shortest official games: a reset and a handful of steps


# ---- the vocabulary functions, no data needed ---------------------------------------------------------------------

def test_convert_game_applies_the_patch_edits_and_leaves_new_games_alone() -> None:
    old = {"pddl_domain": "(define (domain alfred)\n)", "solvable": True,
           "grammar": 'template :: "put {o} in/on {r}"; "You arrive at {lend.name}." '
                      '"You put the {o.name} in/on the {r.name}."'}
    new = convert_game(old)
    assert is_old_vintage(old) and not is_old_vintage(new) and old["grammar"].startswith('template :: "put')
    assert '"move {o} to {r}"' in new["grammar"] and "You arrive at {r.name}." in new["grammar"]
    assert "You move the {o.name} to the {r.name}." in new["grammar"] and "action help {" in new["grammar"]
    assert "(:action help" in new["pddl_domain"] and new["pddl_domain"].endswith(")") and new["solvable"]
    assert convert_game(new) is new


def test_placing_phrasings_and_the_one_match_rule() -> None:
    assert placing_pairs("put mug 1 in desk 1") == [("mug 1", "desk 1")]
    assert placing_pairs("put mug 1 in/on desk 1") == [("mug 1", "desk 1")]
    assert placing_pairs("move mug 1 to desk 1") == [("mug 1", "desk 1")] and placing_pairs("go to desk 1") == []
    new = ["go to desk 1", "move mug 1 to desk 1", "examine desk 1"]
    old = ["go to desk 1", "put mug 1 in/on desk 1"]
    for near_miss in ("put mug 1 in desk 1", "put mug 1 on desk 1", "put mug 1 in/on desk 1"):
        assert translate_placing(near_miss, new) == "move mug 1 to desk 1"
    assert translate_placing("move mug 1 to desk 1", old) == "put mug 1 in/on desk 1"
    assert translate_placing("put mug 1 on desk 1", old) == "put mug 1 in/on desk 1"
    assert translate_placing("move mug 1 to desk 1", new) is None  # admissible as it is
    assert translate_placing("put mug 2 in desk 1", new) is None  # names what no command places
    # Two readings ("a" in "b in c 1", "a in b" in "c 1") that each match an admissible command: ambiguous.
    assert translate_placing("put a in b in c 1", ["move a to b in c 1", "move a in b to c 1"]) is None
    assert translate_placing("put a in b in c 1", ["move a to b in c 1"]) == "move a to b in c 1"
    assert place_command("mug 1", "desk 1", old) == "put mug 1 in/on desk 1"
    assert place_command("mug 1", "desk 1", new) == "move mug 1 to desk 1"


def test_an_unknown_vocabulary_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"command_vocabulary 'new'.*'unified', 'native'"):
        ALFWorldEnv(command_vocabulary="new")


# ---- official games ---------------------------------------------------------------------------------------------

def _env(vocabulary: str, expert: str | None = "planner") -> tuple[ALFWorldEnv, int]:
    env = ALFWorldEnv(split="valid_seen", data_path=DATA, command_vocabulary=vocabulary, expert=expert)
    return env, env.item_strata.index(TASK_TYPE)


def _play(env: ALFWorldEnv, game: int, phrase=lambda command: command) -> tuple[list[tuple[str, str, dict]], dict]:
    """The planner's plan, each command phrased by ``phrase``: (command, feedback, info) per step, the last info."""
    _, info = env.reset(options={"game": game})
    steps = []
    while not info["won"] and len(steps) < 30:
        command = phrase(info["expert_action"])
        observation, _, _, _, info = env.step(command)
        steps.append((command, observation, info))
    return steps, info


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@needs_official_games
def test_an_old_vintage_game_is_won_through_the_new_vocabulary_and_its_file_is_untouched() -> None:
    env, game = _env("unified")
    before = _sha(env.game_files[game])
    steps, info = _play(env, game)
    assert info["won"] and info["game_vintage"] == "pre-0.4" and info["translated_actions"] == 0
    commands = [c for c, _, _ in steps]
    assert any(c.startswith("move ") and " to " in c for c in commands) and not any("put " in c for c in commands)
    feedback = " ".join(o for _, o, _ in steps)
    assert "You move the" in feedback and "You arrive at loc" not in feedback
    assert all(not a.startswith("put ") for _, _, i in steps for a in i["admissible_commands"])
    assert env.step("help")[0].lstrip().startswith("Available commands:")  # the patch's help action
    assert _sha(env.game_files[game]) == before and not Path(env.game_files[game] + ".bak").exists()
    env.close()


@needs_official_games
def test_the_native_option_keeps_the_files_own_vocabulary() -> None:
    env, game = _env("native")
    steps, info = _play(env, game)
    assert info["won"] and info["game_vintage"] == "pre-0.4"
    assert any(c.startswith("put ") and " in/on " in c for c, _, _ in steps)
    assert "You arrive at loc" in " ".join(o for _, o, _ in steps)
    env.close()


def _old_phrase(command: str) -> str:
    return command.replace("move ", "put ", 1).replace(" to ", " in/on ", 1) if command.startswith("move ") \
        else command


def _new_phrase(command: str) -> str:
    return command.replace("put ", "move ", 1).replace(" in/on ", " to ", 1) if command.startswith("put ") \
        else command


def _issue_78_phrase(command: str) -> str:
    return command.replace("move ", "put ", 1).replace(" to ", " on ", 1) if command.startswith("move ") \
        else command


@needs_official_games
@pytest.mark.parametrize(("vocabulary", "phrase"), [("unified", _old_phrase), ("native", _new_phrase),
                                                    ("unified", _issue_78_phrase)])
def test_the_other_vintages_placing_and_issue_78_near_misses_are_translated(vocabulary: str, phrase) -> None:
    env, game = _env(vocabulary)
    steps, info = _play(env, game, phrase)
    assert info["won"]
    translated = [i["translated_action"] for c, _, i in steps if i["translated_action"]]
    template = "move {} to {}" if vocabulary == "unified" else "put {} in/on {}"
    assert translated == [template.format(*placing_pairs(c)[0]) for c, _, _ in steps if placing_pairs(c)]
    assert info["translated_actions"] == len(translated) >= 1
    env.close()


def _memory_episode(env: ALFWorldEnv, game: int) -> tuple[list[str], bool]:
    """The memory aid's expert playing ``game`` from what the ``memory=True`` prompt shows; its commands, won."""
    first_obs, first_info = env.reset(options={"game": game})
    observation, info, history = first_obs, first_info, []
    while not info["won"] and len(history) < env.max_steps:
        memory = recall(first_obs, first_info, history, observation, info, first_info["task"])
        command = memory_expert(memory, info["admissible_commands"])
        if command is None:
            break
        next_obs, _, _, _, next_info = env.step(command)
        history.append(Turn(observation=observation, info=info, response=command, action=command))
        observation, info = next_obs, next_info
    return [t.action for t in history], bool(info["won"])


@needs_official_games
def test_the_memory_aid_plays_both_vocabularies_alike() -> None:
    unified, game = _env("unified", expert=None)
    native, _ = _env("native", expert=None)
    new_commands, new_won = _memory_episode(unified, game)
    old_commands, old_won = _memory_episode(native, game)
    assert new_won and old_won
    assert [_new_phrase(c) for c in old_commands] == new_commands
    assert any(c.startswith("put ") for c in old_commands) and any(c.startswith("move ") for c in new_commands)
    unified.close()
    native.close()
