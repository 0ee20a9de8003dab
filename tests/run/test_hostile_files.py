"""Hostile files and arguments at every entry point (issue 44): each case is one clear error (or a safe result) with
nothing written or deleted — never a hang, a traceback, a MemoryError or silently bad data.

Classes: files that are not regular or not bounded; valid JSON/YAML of the wrong shape or type; configuration that
runs as code (chat templates, `run.imports`); entry points other than `train` (evaluate, plot, zoo, grid); secrets
that do not follow the key convention; a flooding override key.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from envs.alfworld.data import check_game_file, default_games_root, find_games, resolve_root
from envs.math.data import load_problems
from envs.user_files import UserFileError, load_json
from opd_agents import chat_templates
from opd_agents.chat_templates import ChatTemplateError, render_chat, trial_render
from opd_agents.config import ConfigError, build_config, dump_config, load_config
from opd_agents.run import user_imports
from opd_agents.run.checkpoint import CheckpointError, TrainerState, load_latest, rng_state, save_checkpoint
from opd_agents.run.preflight import preflight
from opd_agents.run.rundir import RunDir
from tests.run.test_reliability_hostile import _write_config
from tests.run.test_reliability_inputs import base_config_data

REPO = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def _digest(root: Path) -> str:
    """Names and bytes of every regular file under `root` (FIFOs and devices by name only)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def game(tmp_path_factory) -> Path:
    """One built-in ALFWorld trial folder (game.tw-pddl + traj_data.json), copied into a data root of its own."""
    source = Path(find_games(default_games_root("train"), "train")[0]).parent
    root = tmp_path_factory.mktemp("alfworld")
    trial = root / "json_2.1.1" / "train" / source.parent.name / source.name
    shutil.copytree(source, trial)
    return trial


def _fresh_game(game: Path, tmp_path: Path) -> Path:
    trial = tmp_path / "json_2.1.1" / "train" / game.parent.name / game.name
    shutil.copytree(game, trial)
    return trial


# --- files that are not regular or not bounded ---------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_a_math_file_that_is_a_fifo_is_refused_without_blocking(tmp_path) -> None:
    with pytest.raises(UserFileError, match="is a FIFO"):
        load_problems(_fifo(tmp_path / "problems.jsonl"))


def test_a_math_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPD_AGENTS_MAX_FILE_MIB", "1")
    big = tmp_path / "problems.jsonl"
    with open(big, "wb") as fh:
        fh.truncate(2 << 30)  # a sparse 2 GiB file: never read
    with pytest.raises(UserFileError, match=r"2,048.0 MiB, over the 1.0 MiB limit.*OPD_AGENTS_MAX_FILE_MIB"):
        load_problems(big)


def test_a_folder_as_the_math_file_is_named(tmp_path) -> None:
    (tmp_path / "problems.jsonl").mkdir()
    with pytest.raises(UserFileError, match="problems.jsonl' is a folder, not a regular file"):
        load_problems(tmp_path / "problems.jsonl")


@pytest.mark.timeout(20)
def test_a_traj_data_linked_to_dev_zero_is_refused(game, tmp_path) -> None:
    trial = _fresh_game(game, tmp_path)
    (trial / "traj_data.json").unlink()
    (trial / "traj_data.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="traj_data.json' is a device, not a regular file"):
        check_game_file(trial / "game.tw-pddl")


@pytest.mark.timeout(20)
def test_a_game_file_that_is_a_fifo_is_refused_without_blocking(game, tmp_path) -> None:
    trial = _fresh_game(game, tmp_path)
    (trial / "game.tw-pddl").unlink()
    _fifo(trial / "game.tw-pddl")
    with pytest.raises(UserFileError, match="game.tw-pddl' is a FIFO"):
        find_games(tmp_path, "train")


def test_alfworld_data_pointing_at_a_file_is_an_error_not_a_fallback(tmp_path, monkeypatch) -> None:
    (tmp_path / "data").write_text("not a folder")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match=r"\$ALFWORLD_DATA=.* is not a folder"):
        resolve_root(None, "train")


@pytest.mark.timeout(20)
def test_a_config_file_that_is_a_fifo_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file .* is a FIFO"):
        load_config(_fifo(tmp_path / "c.yaml"))


@pytest.mark.timeout(60)
def test_a_model_folder_with_a_fifo_for_its_tokenizer_is_refused_before_loading(tmp_path, tiny_model_dirs) -> None:
    folder = tmp_path / "student"
    shutil.copytree(tiny_model_dirs["student"], folder)
    (folder / "tokenizer.json").unlink()
    _fifo(folder / "tokenizer.json")
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs, student={"path": str(folder)}))
    with pytest.raises(ConfigError, match="student.path: model file .*tokenizer.json' is a FIFO"):
        preflight(cfg)


# --- valid JSON / YAML of the wrong shape or type ------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    (b'{"problem": "p", "answer": "1"}\n\xff\xfe\x00junk\n', "line 2 is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),
    (b'[{"problem": "p", "answer": NaN}]', "NaN is not a JSON value"),
    (b'[{"problem": "p", "answer": Infinity}]', "Infinity is not a JSON value"),
    (json.dumps([{"problem": "p", "answer": "1" * 1001}]).encode(), "record 0 has the wrong shape: answer: String "
                                                                    "should have at most 1000 characters"),
])
def test_malformed_math_data_names_the_file_and_the_place(tmp_path, content: bytes, problem: str) -> None:
    path = tmp_path / ("problems.jsonl" if b"junk" in content else "problems.json")
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem):
        load_problems(path)


def test_a_non_finite_parquet_answer_is_an_unreadable_answer(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["p"], "answer": [math.nan]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"record 0 has an empty or unreadable answer \(answer\)"):
        load_problems(tmp_path / "p.parquet")


@pytest.mark.parametrize("name, content, problem", [
    ("traj_data.json", "[1, 2]", "traj_data.json' has the wrong shape"),
    ("traj_data.json", "not json", "traj_data.json': line 1 is not valid JSON"),
    ("traj_data.json", '{"task_type": 7}', "task_type: Input should be a valid string"),
    ("game.tw-pddl", "[1, 2]", "game.tw-pddl' has the wrong shape"),
    ("game.tw-pddl", '{"pddl_domain": "d", "grammar": "g", "pddl_problem": ["p"], "solvable": true}',
     "pddl_problem: Input should be a valid string"),
])
def test_malformed_game_files_name_the_file(game, tmp_path, name: str, content: str, problem: str) -> None:
    trial = _fresh_game(game, tmp_path)
    (trial / name).write_text(content)
    with pytest.raises(UserFileError, match=problem):
        find_games(tmp_path, "train")


def test_a_solvable_game_with_garbage_pddl_names_the_file(game, tmp_path) -> None:
    from envs.alfworld.env import ALFWorldEnv

    trial = _fresh_game(game, tmp_path)
    data = json.loads((trial / "game.tw-pddl").read_text())
    (trial / "game.tw-pddl").write_text(json.dumps(data | {"pddl_problem": "(define garbage"}))
    env = ALFWorldEnv(data_path=str(tmp_path), expert=None)
    with pytest.raises(ValueError, match=r"game.tw-pddl' cannot be loaded by the engine \(ParseError"):
        env.reset(options={"game": 0})
    env.close()


def _state(step) -> dict:
    learner = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "bad_steps": 0, "skipped_steps": 0}
    return {"step": step, "learner": learner, "rng": rng_state(), "failed_probes": 0}


def test_a_checkpoint_with_a_valid_checksum_but_a_bad_step_falls_back(tmp_path) -> None:
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 1, lambda folder: None, _state(1), keep_last=3)
    save_checkpoint(ckpt, 2, lambda folder: None, _state("abc"), keep_last=3)  # the manifest hashes the bad file
    with pytest.warns(UserWarning, match=r"skipping checkpoint step_2: .*trainer state .* step: Input should be a "
                                         "valid integer"):
        folder, state = load_latest(ckpt, TrainerState)
    assert folder.name == "step_1" and state["step"] == 1 and (ckpt / "step_2").is_dir()


def test_a_checkpoint_whose_only_state_is_malformed_is_a_checkpoint_error(tmp_path) -> None:
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 1, lambda folder: None, _state(1) | {"rng": {"python": "x"}}, keep_last=3)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint .* passes verification"):
        load_latest(ckpt, TrainerState)


def _existing_run(tmp_path: Path, tiny_model_dirs) -> tuple[Path, Path]:
    cfg_path = _write_config(tmp_path, tiny_model_dirs)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return cfg_path, run


@pytest.mark.parametrize("plant, problem", [
    (lambda run: (run / "config.yaml").write_text("- a\n- list\n"), "holds a list, not a saved config"),
    (lambda run: (run / "config.yaml").mkdir(), "config.yaml' is a folder, not a regular file"),
    (lambda run: (run / ".lock").mkdir(), r"\.lock' is a folder, not a regular file"),
    (lambda run: _fifo(run / "config.yaml"), "config.yaml' is a FIFO"),
    (lambda run: (run / "checkpoints").write_text("x"), "checkpoints' is not a folder"),
])
def test_a_resumed_run_directory_with_a_malformed_entry_is_untouched(tmp_path, tiny_model_dirs, plant, problem):
    cfg_path, run = _existing_run(tmp_path, tiny_model_dirs)
    plant(run)
    before = _digest(run)
    cfg = load_config(cfg_path)
    with pytest.raises(ConfigError, match=problem):
        RunDir.for_config(cfg).create(cfg, resume=True)
    assert _digest(run) == before


def test_a_nul_byte_in_a_yaml_config_is_a_config_error(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("run: {name: a\x00b}\n")
    with pytest.raises(ConfigError, match="not valid YAML: unacceptable character #x0000"):
        load_config(tmp_path / "c.yaml")


def test_a_stored_evaluation_of_the_wrong_shape_is_named(tmp_path, tiny_model_dirs) -> None:
    from opd_agents.run.evaluation import Evaluator

    (tmp_path / "out" / "eval").mkdir(parents=True)
    (tmp_path / "out" / "eval" / "step_0.json").write_text('{"student": {"math": {"success": "high"}}}')
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs))
    with pytest.raises(UserFileError, match=r"step_0.json' has the wrong shape: student.math.success"):
        Evaluator(cfg, RunDir(tmp_path / "out"))


# --- configuration that runs as code ------------------------------------------------------------------------------

def test_a_template_syntax_error_is_a_start_up_error_naming_the_template(tmp_path, tiny_model_dirs) -> None:
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs,
                              student={"chat_template": "{% for m in messages %}{{ m.content }"}))
    with pytest.raises(ConfigError, match=r"student.chat_template: Jinja syntax error on line 1"):
        preflight(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(30)
def test_a_template_that_never_ends_fails_the_start_up_trial_in_its_time_bound(monkeypatch) -> None:
    monkeypatch.setattr(chat_templates, "TRIAL_TIMEOUT_S", 3.0)
    never = "{% set x = range(100000)|list %}{% for i in x %}{% for j in x %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"teachers.t.chat_template did not finish .* within 3 s"):
        trial_render({"teachers.t.chat_template": (never, {})})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source, problem", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 0.5 s"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}", "output passed"),
    ("{{ 'x' * 1000000000 }}", "repeating a value 1,000,000,000 times"),
    ("{{ 'x'.ljust(1000000000) }}", "an argument of 1,000,000,000"),
    ("{{ ('\n' * 4000000)|indent(4000000) }}", "indent would make about"),
    ("{{ '{:>999999999}'.format(1) }}", "format would make about"),
    ("{{ 9 ** 999999 }}", "larger than templates may compute"),
    ("{{ ().__class__.__base__.__subclasses__() }}", "SecurityError|UndefinedError"),
])
def test_rendering_is_sandboxed_and_bounded_in_output_and_time(monkeypatch, source: str, problem: str) -> None:
    monkeypatch.setattr(chat_templates, "RENDER_TIMEOUT_S", 0.5)
    with pytest.raises(ChatTemplateError, match=problem):
        render_chat(source, CHAT, add_generation_prompt=True, name="student.chat_template")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body, problem", [
    ("import time\ntime.sleep(600)\n", "still importing after 3 s"),
    ("import os\nos._exit(0)\n", "ended with exit code 0 while importing it"),
    ("raise SystemExit(3)\n", r"SystemExit\(3\)"),
])
def test_run_imports_that_hang_or_exit_are_one_clear_error(tmp_path, monkeypatch, body: str, problem: str) -> None:
    name = f"hostile_plugin_{abs(hash(body))}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(user_imports, "IMPORT_TIMEOUT_S", 3.0)
    with pytest.raises(ConfigError, match=rf"run.imports: cannot import '{name}': .*{problem}"):
        user_imports.import_user_modules([name])
    assert name not in sys.modules


# --- entry points other than train ---------------------------------------------------------------------------------

def _big_checkpoint(tmp_path: Path, tiny_model_dirs) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dirs["student"], folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"hidden_size": 50_000, "num_hidden_layers": 100, "intermediate_size": 128}  # ~10^12 parameters
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_evaluate_checks_the_checkpoint_config_size_before_loading_it(tmp_path, tiny_model_dirs, capsys) -> None:
    from opd_agents.evaluate import main as evaluate_main

    ckpt = _big_checkpoint(tmp_path, tiny_model_dirs)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(_write_config(tmp_path, tiny_model_dirs)), "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: student.path: config.json describes a model of about")
    assert "more than this machine's" in err and not (tmp_path / "runs").exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, tiny_model_dirs) -> None:
    folder = tmp_path / "student"
    shutil.copytree(tiny_model_dirs["student"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs, student={"path": str(folder)}))
    with pytest.raises(ConfigError, match=r"the tokenizer has \d+ tokens but config.json's vocab_size is 100"):
        preflight(cfg)


@pytest.mark.timeout(30)
def test_a_ray_address_that_does_not_answer_is_a_start_up_error(tmp_path, tiny_model_dirs) -> None:
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs, ray={"address": "127.0.0.1:1", "connect_timeout_s": 2}))
    with pytest.raises(ConfigError, match=r"ray.address = '127.0.0.1:1': nothing answers there within 2 s"):
        preflight(cfg)


@pytest.mark.parametrize("argv, problem", [
    (["build", "--build-seed", str(2**40)], "--build-seed 1099511627776 is out of range"),
    (["build", "--threads", "0"], "--threads 0 is out of range"),
    (["diagnose", "zoo:student", "--games", "0"], "--games 0 is out of range"),
])
def test_zoo_arguments_out_of_range_are_refused_first(capsys, argv, problem) -> None:
    from opd_agents.zoo.__main__ import main as zoo_main

    assert zoo_main(argv) == 2 and capsys.readouterr().err.startswith(f"error: {problem}")


@pytest.mark.parametrize("force", [False, True])
def test_zoo_build_never_builds_into_or_deletes_a_folder_that_is_not_a_zoo(tmp_path, capsys, force) -> None:
    from opd_agents.zoo.__main__ import main as zoo_main

    mine = tmp_path / "my_documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert zoo_main(["build", "--out", str(mine)] + (["--force"] if force else [])) == 2
    assert "holds ['thesis.tex'] and no zoo build" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def _plot(run: Path, capsys) -> tuple[int, str]:
    from opd_agents.plot import main as plot_main

    try:
        code = plot_main([str(run)])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("line", [
    '{"train/loss": 0.5}',  # no step
    '{"step": 2, "train/loss": ' + "1" + "0" * 400 + "}",  # 10^400: no float holds it
    '{"step": 2, "$a^$/train/loss": 0.4, "eval/$}$/success": 0.3}',  # `$..$`: matplotlib's math, which fails
])
def test_plot_draws_what_it_can_of_odd_records(tmp_path, capsys, line: str) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n' + line + "\n")
    code, err = _plot(tmp_path, capsys)
    assert code == 0 and err == "" and (tmp_path / "plots" / "train_loss.png").is_file()


def _plots_is_a_file(run: Path) -> None:
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    (run / "plots").write_text("x")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("plant, problem", [
    (lambda run: _fifo(run / "metrics.jsonl"), "metrics.jsonl' is a FIFO"),
    (lambda run: (run / "metrics.jsonl").mkdir(), "metrics.jsonl' is a folder"),
    (_plots_is_a_file, "plots' exists and is not a folder"),
])
def test_plot_refuses_what_it_cannot_read_or_write_before_writing(tmp_path, capsys, plant, problem) -> None:
    plant(tmp_path)
    before = _digest(tmp_path)
    code, err = _plot(tmp_path, capsys)
    assert code == 2 and err.startswith("error: ") and problem in err and _digest(tmp_path) == before


@pytest.mark.parametrize("stored, problem", [
    ([1, 2], "holds a list, not a JSON object"),
    ({"rows": {}, "runs": {"topk": {"0": {"status": "done", "eval": {"math": {"success": "high"}}}}}},
     "runs.topk.0.eval.math.success"),
    ({"rows": {"topk": {}}, "runs": {"topk": {"seed-x": {"status": "done"}}}}, "runs.topk.seed-x"),
    ({"rows": {"t$p": {}}, "runs": {}}, r"rows.t\$p"),
])
def test_grid_rerender_of_a_wrong_shape_results_file_writes_nothing(tmp_path, capsys, stored, problem) -> None:
    from experiments.grid import main as grid_main

    (tmp_path / "results.json").write_text(json.dumps(stored))
    before = _digest(tmp_path)
    assert grid_main(["--rerender", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a grid's results" in err and problem.replace("\\", "") in err
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("argv, problem", [
    (["--seeds", "-1"], "every seed must be in [0, 2^32)"),
    (["--zoos", str(10**7)], "every zoo build seed must be in [0, 1000000]"),
])
def test_grid_arguments_are_checked_before_anything_runs(tmp_path, capsys, argv, problem) -> None:
    from experiments.grid import main as grid_main

    assert grid_main(argv + ["--out", str(tmp_path / "grid")]) == 2
    assert problem in capsys.readouterr().err and not (tmp_path / "grid").exists()


# --- secrets that do not follow the key convention; flooding keys --------------------------------------------------

TOKENS = ["hf_" + "AbCd1234" * 5, "ghp_" + "A1b2" * 9, "github_pat_" + "A1b2c3" * 7, "sk-proj-" + "Ab1x" * 10,
          "AKIAIOSFODNN7EXAMPLE", "xoxb-123456789012-abcdefghij", "AIza" + "B" * 35,
          "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9Pl"]
SECRET_KEYS = {"githubToken": "a1", "GithubToken": "b2", "github-token": "c3", "HF_TOKEN": "d4", "apiKey": "e5",
               "clientSecret": "f6", "db-password": "g7"}
NOT_SECRETS = {"eos_token": "<|im_end|>", "max_new_tokens": 7, "special_tokens": ["<a>"], "token_budget": 3,
               "sha256": hashlib.sha256(b"x").hexdigest(), "model": "Qwen/Qwen2.5-7B-Instruct",
               "path": "/data/hf_datasets/gsm8k.jsonl", "run": "runs/sk-learn-baseline-results-v1",
               "cache": "/root/.cache/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/" + "a1" * 20}


def test_secrets_are_redacted_by_key_in_any_case_style_and_by_value_shape_and_only_secrets(tmp_path,
                                                                                          tiny_model_dirs) -> None:
    from opd_agents.config import REDACTED

    values = {"note": f"token {TOKENS[0]} here", "url": f"https://x:{TOKENS[1]}@github.com/o/r",
              "header": f"Bearer {TOKENS[-1]}", "list": TOKENS[2:-1]}
    cfg = load_config(_write_config(tmp_path, tiny_model_dirs))
    options = SECRET_KEYS | values | NOT_SECRETS
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"options": options})})
    text = dump_config(cfg)
    saved = yaml.safe_load(text)["loss"]["options"]
    assert {k: saved[k] for k in SECRET_KEYS} == dict.fromkeys(SECRET_KEYS, REDACTED)
    assert not [t for t in TOKENS if t in text] and saved["url"] == f"https://x:{REDACTED}@github.com/o/r"
    assert {k: saved[k] for k in NOT_SECRETS} == NOT_SECRETS  # digests, hub ids, paths, tokenizer tokens stay


def test_a_huge_unknown_override_key_does_not_flood_the_error(tmp_path, tiny_model_dirs) -> None:
    data = base_config_data(tmp_path, tiny_model_dirs)
    with pytest.raises(ConfigError) as error:
        build_config(data, ["loss." + "x" * 100_000 + "=1"])
    assert "100,005 characters" in str(error.value) and len(str(error.value)) < 400
    with pytest.raises(ConfigError) as error:
        build_config({**data, "loss": {"y" * 100_000: 1}})
    assert "100,005 characters" in str(error.value) and len(str(error.value)) < 1000


def test_the_start_up_trial_accepts_the_real_templates(tiny_tokenizer) -> None:
    trial_render({"student.chat_template": (tiny_tokenizer.chat_template,
                                            chat_templates.tokenizer_variables(tiny_tokenizer))})


def test_bounded_rendering_equals_apply_chat_template(tiny_tokenizer) -> None:
    chats = [CHAT, [{"role": "system", "content": "s"}, *CHAT, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "and 4 + 4?"}]]
    for chat in chats:
        for prompt in (True, False):
            expected = tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert chat_templates.render_with_tokenizer(tiny_tokenizer, chat, add_generation_prompt=prompt) == expected


def test_the_user_file_layer_reads_a_plain_json_file(tmp_path) -> None:
    (tmp_path / "a.json").write_text('\ufeff{"a": [1, 2.5, null]}')
    assert load_json(tmp_path / "a.json", 1 << 10) == {"a": [1, 2.5, None]}


def test_the_hostile_files_cli_case_is_one_line(tmp_path) -> None:
    os.mkfifo(tmp_path / "c.yaml")
    result = subprocess.run([sys.executable, "-m", "opd_agents.train", str(tmp_path / "c.yaml")], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "is a FIFO" in result.stderr
