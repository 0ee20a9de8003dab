"""Building the embedded zoo: the recipe and the build itself.

Owns the recipe constants (tokenizer size, model sizes, training budgets and mixes, the env settings every zoo
model is trained and scored with), the build version (a hash of the recipe, so a recipe change rebuilds into a
new folder), and ``build_zoo``: demonstrations -> one shared tokenizer -> student and teachers trained with
:mod:`~opd_agents.zoo.sft` (in parallel build processes; the student's checkpoint chosen by
:mod:`~opd_agents.zoo.selection`) -> each scored on held-out problems / games by
:mod:`~opd_agents.zoo.scoring` -> ``save_pretrained`` folders plus ``zoo_manifest.json``. ``ensure_zoo`` is the
cached, locked entry point (see :mod:`~opd_agents.zoo.paths`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.devices import cpu_name
from opd_agents.zoo import demos
from opd_agents.zoo.models import TinySize, build_tiny_model
from opd_agents.zoo.paths import MANIFEST, build_once, cache_root
from opd_agents.zoo.processes import run_jobs
from opd_agents.zoo.scoring import ALFWORLD_EVAL_SPLIT, evaluate_alfworld, evaluate_math
from opd_agents.zoo.selection import Checkpoints, Selection, hold_out_dev
from opd_agents.zoo.sft import Pair, SFTConfig, tokenize_pair, train_sft
from opd_agents.zoo.tokenizer import train_tokenizer

FORMAT_VERSION = "5"  # bump when the build code changes what it produces for the same recipe
TASKS = ("math", "alfworld")

# The env settings the zoo is trained and scored with; the default config must use exactly these.
# Math: level 0 = 2-digit addition written in a fixed token layout (one column per line, carries explicit, answer
# zero-padded to 3 digits): a 3-layer h128 model learns it to 100% in ~600 steps, the other layouts tried stayed
# under 5% in the same budget (measurements in the closing notes). No system prompt (short prompts).
MATH_ENV = {"levels": [0], "num_problems": 4000, "system_prompt": ""}
# ALFWorld: the compact per-turn prompt with the agent's memory (what it holds, what it seeks: here or where to look)
# and no history or command list (the expert's state and every name a command needs are in the memory lines, and
# shorter prompts buy more SFT steps: 107 tokens on average instead of 184), and an action-only answer (no <think>).
ALFWORLD_ENV = {"adapter": {"compact": True, "think": False, "history_length": 0, "memory": True,
                             "list_actions": False}, "max_steps": 20}


@dataclass(frozen=True)
class ModelRecipe:
    """One zoo model: its size and seed, the share of each task's demonstrations it trains on, its SFT run.

    ``init_from``: start from an earlier model of the recipe instead of random weights (its size is then ignored);
    ``end_token``: the token its responses end with (default the tokenizer's eos, ``<|im_end|>``);
    ``prompt_loss_tasks``: the tasks whose examples take the prompt loss when ``sft.prompt_loss_weight`` > 0 (None:
    every task).
    """

    size: TinySize
    seed: int
    mix: dict[str, float]
    sft: SFTConfig
    init_from: str | None = None
    end_token: str | None = None
    prompt_loss_tasks: tuple[str, ...] | None = None
    select: Selection | None = None


@dataclass(frozen=True)
class Recipe:
    vocab_size: int = 1024
    math_env: dict[str, Any] = field(default_factory=lambda: dict(MATH_ENV))
    alfworld_env: dict[str, Any] = field(default_factory=lambda: dict(ALFWORLD_ENV))
    alfworld_train_games: int | None = None  # None: every train game
    # Extra plays of each train game with random detours, labelled by the expert (DAgger-style state coverage).
    alfworld_replays: int = 3
    alfworld_detour: float = 0.3
    # Extra expert labels per visited state under counterfactual tasks (demos._relabelled_task): they stop the
    # memorising of train rooms and show every object name in the copy slots (200 s SFT runs, 30 eval games:
    # 40% -> 63% of episodes won without the "Holding" line last, 53% -> 90% with it).
    alfworld_relabels: int = 3
    eval_math_problems: int = 200
    eval_alfworld_games: int = 90  # the whole default eval split: at 30 games one standard error was ~7 points
    eval_batch: int = 32
    # 0: the default build. Another seed builds an independent zoo of the same recipe and data: every model's init,
    # SFT batch order and demonstration share are drawn from its seed + BUILD_SEED_STRIDE * build_seed — what
    # another machine's float arithmetic does to a build, made reproducible (`run.zoo_seed`, issue 26).
    build_seed: int = 0
    models: dict[str, ModelRecipe] = field(default_factory=lambda: {
        # The two teachers differ in size, seed and mix, as the paper's two teachers do.
        "math-teacher": ModelRecipe(TinySize(3, 128, 4, 2, 384), seed=1, mix={"math": 1.0, "alfworld": 0.0125},
                                    sft=SFTConfig(lr=3e-3, max_steps=600, time_budget_s=450, batch_size=16, seed=1)),
        # ALFWorld: the narrowest, fastest size gets the most SFT steps in the budget (per-decision accuracy grows
        # with steps far more than with width; measurements in the closing notes). It trains in its own build
        # process, alongside the three others (200 s: 90% of eval games won, 360 s: 97%). A step count, not the
        # time budget, ends every model on any machine up to ~3x slower (or busier) than the 2-core reference: the
        # same model everywhere. (The budgets were 1.5x: a build with the cores busy stopped all three SFT runs early,
        # experiments/results/zoo_builds/7101a0da0da6_loaded.json.)
        # The prompt loss teaches the copying that choosing an action needs (sft.SFTConfig.prompt_loss_weight).
        "alfworld-teacher": ModelRecipe(TinySize(2, 128, 4, 2, 384), seed=2, mix={"math": 0.05, "alfworld": 1.0},
                                        sft=SFTConfig(lr=3e-3, max_steps=1700, time_budget_s=1260, batch_size=16,
                                                      seed=2, prompt_loss_weight=1.0)),
        # The math teacher with another end-of-turn convention: it ends answers with <|endoftext|> (as Qwen2.5 base
        # models do) where the student ends with <|im_end|> (as Qwen2.5-Instruct does), the miniature of the paper's
        # tokenizer/special-token mismatch (OpenThinker3 vs Qwen2.5-Instruct). Same vocabulary: only the convention
        # differs, so at each student end-of-turn the teacher puts its mass on another token (the grid's `*_mask`
        # rows: `--set teachers.math_teacher.model=zoo:math-teacher-eot --special-tokens '<|im_end|>'`).
        "math-teacher-eot": ModelRecipe(TinySize(3, 128, 4, 2, 384), seed=4, mix={"math": 0.25},
                                        sft=SFTConfig(lr=1e-3, max_steps=60, time_budget_s=90, warmup_steps=5,
                                                      seed=4),
                                        init_from="math-teacher", end_token="<|endoftext|>"),
        # Deliberately weaker than both teachers but competent at both tasks, so that on-policy distillation has
        # well-formed turns to score (a student that never forms an ALFWorld command gets nothing from OPD: the main
        # job took it 0% -> 0%). The ALFWorld teacher's size, and its prompt loss on ALFWorld prompts only (on math
        # prompts too, one 600-step run: math 8% instead of 22.5%), stopped early on both learning curves. Its start
        # is deterministic for a recipe but jumpy in the step count (200 eval problems; one 850-step run: math 20% at
        # step 750, 24% at 800, 30% at 850; ALFWorld share 0.5, 800 steps: 43%), as it is in ALFWorld games won
        # (13-17% here from 75-78% of single expert decisions; 57% from 87%): retune when the data or tokenizer change.
        "student": ModelRecipe(TinySize(), seed=3, mix={"math": 1.0, "alfworld": 0.6},
                               sft=SFTConfig(lr=3e-3, max_steps=1200, time_budget_s=900, batch_size=16,
                                             warmup_steps=5, seed=3, prompt_loss_weight=1.0),
                               prompt_loss_tasks=("alfworld",),
                               select=Selection(target=0.45, first_step=600, every=50)),
    })


DEFAULT_RECIPE = Recipe()
BUILD_SEED_STRIDE = 1000


def with_build_seed(recipe: Recipe, build_seed: int) -> Recipe:
    """``recipe`` as built under ``build_seed`` (see :attr:`Recipe.build_seed`); every model seed is moved."""
    if build_seed < 0:
        raise ValueError(f"zoo build seed {build_seed} must be >= 0")
    shift = BUILD_SEED_STRIDE * (build_seed - recipe.build_seed)
    models = {name: replace(spec, seed=spec.seed + shift, sft=replace(spec.sft, seed=spec.sft.seed + shift))
              for name, spec in recipe.models.items()}
    return replace(recipe, build_seed=build_seed, models=models)


def alfworld_data_key() -> list[Any]:
    """What identifies the default ALFWorld game set the teachers learn from (its generator settings)."""
    from envs.alfworld import data

    return [data.GENERATOR_VERSION, data.DEFAULT_SEED, data.DEFAULT_COUNTS]


def build_version(recipe: Recipe = DEFAULT_RECIPE) -> str:
    key = json.dumps([FORMAT_VERSION, asdict(recipe), alfworld_data_key()], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# ---- the build ----------------------------------------------------------------------------------------------------
def _select(pairs_by_task: dict[str, list[Pair]], mix: dict[str, float], seed: int) -> list[tuple[str, Pair]]:
    """(task, pair) for each task's share of its demonstrations, drawn by ``seed``."""
    chosen: list[tuple[str, Pair]] = []
    for task, share in mix.items():
        pool = list(pairs_by_task[task])
        random.Random(seed).shuffle(pool)
        chosen += [(task, pair) for pair in pool[:round(share * len(pool))]]
    return chosen


def _train(name: str, spec: ModelRecipe, tokenizer: PreTrainedTokenizerBase,
           pairs_by_task: dict[str, list[Pair]], trained: dict[str, PreTrainedModel], math_env: dict[str, Any],
           position: int = 0) -> tuple[PreTrainedModel, dict[str, Any]]:
    first_dev = 0
    if spec.select is not None:
        math_train, first_dev = hold_out_dev(pairs_by_task["math"], spec.select)
        pairs_by_task = {**pairs_by_task, "math": math_train}
    examples = [tokenize_pair(tokenizer, pair, spec.end_token,
                              prompt_loss=spec.prompt_loss_tasks is None or task in spec.prompt_loss_tasks)
                for task, pair in _select(pairs_by_task, spec.mix, spec.seed)]
    if spec.init_from is not None:
        model = copy.deepcopy(trained[spec.init_from])
    else:
        model = build_tiny_model(tokenizer, spec.size, seed=spec.seed)
    if spec.end_token is not None:
        # Generation (the teacher played as a policy) stops at either end of turn.
        model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                                tokenizer.convert_tokens_to_ids(spec.end_token)]
    with tqdm(total=spec.sft.max_steps, desc=f"zoo: training {name}", unit="step", leave=False,
              position=position) as bar:
        checkpoints = None if spec.select is None else Checkpoints(
            spec.select, model, tokenizer, math_env, first_dev, spec.sft.max_steps)

        def tick(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if checkpoints is not None:
                checkpoints(step)

        result = train_sft(model, tokenizer, examples, spec.sft, on_step=tick)
    selection = None if checkpoints is None else checkpoints.finish(result.steps)
    tail = result.losses[-20:]
    return model, {"size": asdict(spec.size), "seed": spec.seed, "mix": spec.mix, "examples": len(examples),
                   "selection": selection,
                   "init_from": spec.init_from, "end_token": spec.end_token,
                   "prompt_loss_tasks": spec.prompt_loss_tasks,
                   "sft": asdict(spec.sft), "steps": result.steps, "budget_bound": result.budget_bound,
                   "train_seconds": round(result.seconds, 1),
                   "final_loss": round(sum(tail) / len(tail), 4),
                   "parameters": sum(p.numel() for p in model.parameters())}


def _evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe,
              tasks: Sequence[str]) -> dict[str, float]:
    scores = {}
    if "math" in tasks:
        scores["math"] = evaluate_math(model, tokenizer, recipe.math_env, recipe.eval_math_problems, recipe.eval_batch)
    if "alfworld" in tasks:
        scores["alfworld"] = evaluate_alfworld(model, tokenizer, recipe.alfworld_env, recipe.eval_alfworld_games)
    return scores


def _groups(models: dict[str, ModelRecipe], workers: int) -> list[list[str]]:
    """The recipe's models split over ``workers`` processes: a model trains after, and in the same process as, the
    model it starts from (``init_from``); chains go longest first (by time budget) to the least loaded process.
    Each group keeps recipe order."""
    chains: dict[str, list[str]] = {}
    root: dict[str, str] = {}
    for name, spec in models.items():
        if spec.init_from is not None and spec.init_from not in root:
            raise ValueError(f"zoo recipe: {name!r} starts from {spec.init_from!r}, which must come earlier in the "
                             f"recipe; earlier models: {sorted(root)}")
        root[name] = name if spec.init_from is None else root[spec.init_from]
        chains.setdefault(root[name], []).append(name)
    cost = {head: sum(models[n].sft.time_budget_s for n in chain) for head, chain in chains.items()}
    loads: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(max(1, min(workers, len(chains))))]
    for head in sorted(chains, key=lambda h: -cost[h]):
        slot = min(range(len(loads)), key=lambda i: loads[i][0])
        loads[slot] = (loads[slot][0] + cost[head], loads[slot][1] + chains[head])
    order = list(models)
    return [sorted(names, key=order.index) for _, names in loads if names]


def _train_group(out: Path, recipe: Recipe, names: list[str], pairs_by_task: dict[str, list[Pair]],
                 eval_tasks: dict[str, Sequence[str]], threads: int | None, position: int) -> dict[str, Any]:
    """Train, score and save ``names`` in order (one build process); returns their manifest entries."""
    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    trained: dict[str, PreTrainedModel] = {}
    entries: dict[str, Any] = {}
    for name in names:
        model, entry = _train(name, recipe.models[name], tokenizer, pairs_by_task, trained, recipe.math_env,
                              position)
        trained[name] = model
        eval_started = time.perf_counter()
        entry["eval_success"] = _evaluate(model, tokenizer, recipe, eval_tasks.get(name, ()))
        entry["eval_seconds"] = round(time.perf_counter() - eval_started, 1)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        entry["weights_sha256"] = hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest()
        entries[name] = entry
    return entries


def default_workers() -> int:
    """Build processes: one per core, at most two (the recipe's time budgets assume two cores)."""
    return max(1, min(2, os.cpu_count() or 1))


def build_zoo(out: Path, recipe: Recipe = DEFAULT_RECIPE, eval_tasks: dict[str, Sequence[str]] | None = None,
              log: Callable[[str], None] = print, threads: int | None = 1,
              workers: int | None = None) -> dict[str, Any]:
    """Build every zoo model into ``out`` (an empty folder); returns the manifest (also written there).

    ``eval_tasks``: per model, the tasks to score it on (default: each teacher on its task, the student on both).
    ``threads``: torch CPU threads per build process. One by default: models this small gain little from a second
    thread, and lose up to 10x when the cores are shared with other processes (OpenMP threads spin-wait).
    ``workers``: build processes (default :func:`default_workers`): the ALFWorld demonstrations are played, and the
    models trained, in parallel (the ALFWorld teacher's time budget assumes two).
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or saved_threads)
    try:
        return _build(out, recipe, eval_tasks, log, threads, workers or default_workers())
    finally:
        torch.set_num_threads(saved_threads)


def _build(out: Path, recipe: Recipe, eval_tasks: dict[str, Sequence[str]] | None, log: Callable[[str], None],
           threads: int | None, workers: int) -> dict[str, Any]:
    started = time.perf_counter()
    eval_tasks = eval_tasks or {"math-teacher": ["math"], "math-teacher-eot": ["math"],
                                "alfworld-teacher": ["alfworld"], "student": list(TASKS)}
    groups = _groups(recipe.models, workers)
    log(f"zoo: collecting demonstrations ({workers} process{'es' if workers > 1 else ''})")
    pairs_by_task = {"math": demos.math_pairs(recipe.math_env),
                     "alfworld": [p for episode in demos.alfworld_episodes(
                         recipe.alfworld_env, recipe.alfworld_train_games, replays=recipe.alfworld_replays,
                         detour=recipe.alfworld_detour, relabels=recipe.alfworld_relabels, workers=workers)
                                  for p in episode]}
    tokenizer = train_tokenizer(demos.corpus(pairs_by_task["math"] + pairs_by_task["alfworld"]), recipe.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    manifest: dict[str, Any] = {
        "build_version": build_version(recipe), "build_seed": recipe.build_seed, "machine": machine(threads),
        "vocab_size": len(tokenizer),
        "env_kwargs": {"opd/Math-v0": recipe.math_env, "opd/ALFWorld-v0": recipe.alfworld_env},
        "eval": {"math": {"split": "eval", "problems": recipe.eval_math_problems},
                 "alfworld": {"split": ALFWORLD_EVAL_SPLIT, "games": recipe.eval_alfworld_games}},
        "demonstrations": {task: len(pairs) for task, pairs in pairs_by_task.items()},
        "demonstration_seconds": round(time.perf_counter() - started, 1), "models": {},
    }
    log("zoo: training " + "; ".join(" then ".join(group) for group in groups)
        + (" (in parallel)" if len(groups) > 1 else ""))
    jobs = [(_train_group, (out, recipe, group, pairs_by_task, eval_tasks, threads, position))
            for position, group in enumerate(groups)]
    entries = {name: entry for part in run_jobs(jobs, len(groups), "training") for name, entry in part.items()}
    for name in recipe.models:
        manifest["models"][name] = entry = entries[name]
        log(f"zoo: {name}: {entry['steps']} steps in {entry['train_seconds']}s, success {entry['eval_success']}")
        if entry["budget_bound"]:
            log(f"zoo: warning: {name} stopped at its {recipe.models[name].sft.time_budget_s:.0f} s budget after "
                f"{entry['steps']} of {recipe.models[name].sft.max_steps} steps (this machine is far slower than "
                "the recipe assumes, or busy): it differs from the same build elsewhere")
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    manifest["workers"] = len(groups)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(format_table(manifest))
    return manifest


def machine(threads: int | None) -> dict[str, Any]:
    """What a build's numbers depend on besides the recipe: the CPU, the library versions, the thread count."""
    import platform

    import transformers

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads_per_process": threads}


def format_table(manifest: dict[str, Any]) -> str:
    rows = [f"{'model':<18}{'params':>9}{'steps':>7}{'train s':>9}" + "".join(f"{t:>10}" for t in TASKS)]
    for name, entry in manifest["models"].items():
        scores = "".join(f"{entry['eval_success'][t]:>10.0%}" if t in entry["eval_success"] else f"{'-':>10}"
                         for t in TASKS)
        rows.append(f"{name:<18}{entry['parameters']:>9}{entry['steps']:>7}{entry['train_seconds']:>9}{scores}")
    rows.append(f"build: {manifest['build_seconds']}s, version {manifest['build_version']}, "
                f"build seed {manifest.get('build_seed', 0)}")
    return "\n".join(rows)


def ensure_zoo(force: bool = False, out: Path | None = None, recipe: Recipe = DEFAULT_RECIPE,
               threads: int | None = 1, workers: int | None = None, build_seed: int | None = None) -> Path:
    """The built zoo folder (``out``, or the cache folder for ``recipe``), building it under the lock if needed.
    ``build_seed``: build ``recipe`` under that seed instead of its own (:func:`with_build_seed`)."""
    if build_seed is not None:
        recipe = with_build_seed(recipe, build_seed)
    folder = Path(out) if out is not None else cache_root() / build_version(recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return build_once(folder, lambda tmp: build_zoo(tmp, recipe, threads=threads, workers=workers), force=force)


def miniature(recipe: Recipe, steps: int, budget_s: float, size: TinySize) -> Recipe:
    """``recipe`` with every model shrunk to ``size`` and ``steps``/``budget_s`` of training (tests, smoke runs); a
    checkpoint selection scores every step on 3 dev problems."""
    small = {name: replace(spec, size=size, sft=replace(spec.sft, max_steps=steps, time_budget_s=budget_s,
                                                        warmup_steps=min(spec.sft.warmup_steps, steps)),
                           select=spec.select and replace(spec.select, first_step=1, every=1, dev_problems=3))
             for name, spec in recipe.models.items()}
    return replace(recipe, models=small)


