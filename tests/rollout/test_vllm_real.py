"""The vLLM rollout backend against real vLLM (its x86 CPU build; no fake `LLM`): behaviour log-probs, seeds, stop
labels, weight sync through the gloo weight-transfer engine, a Ray RolloutGroup of vLLM workers surviving killed
workers (mid-request and between syncs), and the real trainer with vLLM rollouts and a vLLM teacher (math, resumed
once; ALFWorld per turn).

Runs in the venv scripts/install_vllm_cpu.sh builds: `pytest -m vllm tests/rollout/test_vllm_real.py`. Eleven engines
start here (the module's policy; the group's two workers and two replacements; a rollout and a teacher engine per
training run, three runs): ~6 min on 2 cores.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.config import ModelConfig, RolloutConfig, TaskConfig
from opd_agents.rollout import SamplingParams
from opd_agents.sampling import processed_logprobs
from opd_agents.seeding import mix_seed
from opd_agents.zoo.models import TinySize, build_tiny_model

# vLLM's CPU build: a 1 GiB KV cache per engine, and no core pinning (the cores are shared).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
vllm = pytest.importorskip("vllm", reason="real vLLM is not installed here: build its venv with "
                                          "scripts/install_vllm_cpu.sh and run pytest -m vllm there")
pytestmark = pytest.mark.vllm


# Head size 32 (vLLM's CPU attention needs >= 32); small engine limits keep start-up short.
SIZE = TinySize(2, 64, 2, 1, 128, max_positions=2048)
# ALFWorld prompts need ~1k tokens of the tiny tokenizer.
ENGINE = {"enforce_eager": True, "max_model_len": 2048, "max_num_seqs": 16}
TEXTS = ["What is 12 + 35?", "Solve 3x + 4 = 19.", "You are in the middle of a room.", "take apple 1 from"]


def save_model(tokenizer, folder: Path, seed: int, extra_eos: int | None = None) -> Path:
    model = build_tiny_model(tokenizer, SIZE, seed=seed)
    if extra_eos is not None:  # a generation-config end token the tokenizer does not know about
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_greedy(model, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop:
                break
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [tiny_tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def student(tiny_tokenizer, tmp_path_factory, prompts) -> tuple[Path, int]:
    """The student folder, whose generation config adds an end token: HF greedy's first token after prompt 0."""
    root = tmp_path_factory.mktemp("vllm_student")
    plain = save_model(tiny_tokenizer, root / "plain", seed=0)
    first = hf_greedy(AutoModelForCausalLM.from_pretrained(plain), prompts[0], 1, set())[0]
    assert first != tiny_tokenizer.eos_token_id
    return save_model(tiny_tokenizer, root / "student", seed=0, extra_eos=first), first


@pytest.fixture(scope="module")
def policy(student, tiny_tokenizer):
    from opd_agents.rollout.vllm_policy import VLLMPolicy

    rollout = RolloutConfig(backend="vllm", vllm=ENGINE)
    # A 63-bit seed, as the rollout group derives them (vLLM's engine takes 32 bits).
    p = VLLMPolicy.from_config(ModelConfig(path=str(student[0])), rollout, tiny_tokenizer, seed=mix_seed(0, 1))
    yield p
    del p.llm


def hf_behaviour_logprobs(model, prompt: list[int], tokens: list[int], params: SamplingParams) -> torch.Tensor:
    """(L,) log-probs of `tokens` under the processed (truncated, renormalised) distribution, recomputed by HF."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return processed_logprobs(logits, params).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_top_p_behaviour_logprobs_equal_an_hf_recomputation(policy, student, prompts):
    params = SamplingParams(top_p=0.9, max_new_tokens=12, seed=7)
    gens = policy.generate(prompts, params)
    model = AutoModelForCausalLM.from_pretrained(student[0])
    renormalised = 0
    for prompt, gen in zip(prompts, gens):
        assert len(gen.token_ids) == len(gen.logprobs) >= 1
        want = hf_behaviour_logprobs(model, prompt, gen.token_ids, params)
        assert torch.isfinite(want).all()  # every sampled token lies inside the HF nucleus
        torch.testing.assert_close(torch.tensor(gen.logprobs), want, atol=2e-5, rtol=0)
        raw = hf_behaviour_logprobs(model, prompt, gen.token_ids, SamplingParams(top_p=1.0))
        renormalised += int((want - raw > 1e-3).sum())
    assert renormalised > 0  # the nucleus cut something: these are not the raw log-probs


def test_a_one_token_nucleus_has_logprob_exactly_zero_and_is_greedy(policy, prompts):
    gens = policy.generate(prompts, SamplingParams(top_p=1e-6, max_new_tokens=8, seed=3))
    greedy = policy.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8))
    assert all(lp == 0.0 for g in gens for lp in g.logprobs)
    assert [g.token_ids for g in gens] == [g.token_ids for g in greedy]


def test_same_seed_same_tokens(policy, prompts):
    params = SamplingParams(top_p=0.9, max_new_tokens=12)
    a, b = (policy.generate(prompts, params.with_seed(11)) for _ in range(2))
    c = policy.generate(prompts, params.with_seed(12))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # Copies of one prompt in one call draw different streams.
    copies = policy.generate([prompts[1]] * 4, params.with_seed(11))
    assert len({tuple(g.token_ids) for g in copies}) > 1


def test_generation_config_end_tokens_are_a_stop_not_a_truncation(policy, student, prompts, tiny_tokenizer):
    extra = student[1]
    assert extra in policy.stop_ids and tiny_tokenizer.eos_token_id in policy.stop_ids
    gen, long = policy.generate([prompts[0], prompts[1]], SamplingParams(greedy=True, max_new_tokens=6))
    assert gen.token_ids == [extra] and gen.finish_reason == "stop" and not gen.truncated
    if extra not in long.token_ids and tiny_tokenizer.eos_token_id not in long.token_ids:
        assert len(long.token_ids) == 6 and long.finish_reason == "length"


def test_sync_weights_gives_hf_greedy_of_the_new_weights(policy, student, prompts, tiny_tokenizer):
    """Several syncs through the gloo weight-transfer engine (this process sends): after each, greedy decoding is HF
    greedy with exactly those weights, and the version is committed in vLLM and on the policy."""
    stop = set(policy.stop_ids)
    old = AutoModelForCausalLM.from_pretrained(student[0])
    greedy = SamplingParams(greedy=True, max_new_tokens=10)
    before = [g.token_ids for g in policy.generate(prompts, greedy)]
    assert before == [hf_greedy(old, p, 10, stop) for p in prompts]

    seen = [before]
    for version, seed in enumerate((5, 6, 5), start=1):
        new = build_tiny_model(tiny_tokenizer, SIZE, seed=seed)
        # Sync 1: tied embeddings share storage (a plain state_dict); later syncs: separate copies, as
        # learner.weights() gives them.
        state = new.state_dict() if version == 1 else {k: v.detach().clone() for k, v in new.state_dict().items()}
        policy.load_state_dict(state, version=version)
        after = [g.token_ids for g in policy.generate(prompts, greedy)]
        assert policy.version == version and policy.llm.get_weight_version() == str(version)
        assert policy.weight_transfer == "gloo"
        assert after == [hf_greedy(new, p, 10, stop) for p in prompts]
        seen.append(after)
    assert seen[1] != seen[0] and seen[2] != seen[1] and seen[3] == seen[1]  # seed 5 again: its own output again


TOY = "tests.rollout.test_toyenv"


def worker_greedy(worker, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy responses (10 tokens at most) of a RolloutWorker actor's own policy."""
    import ray

    def generate(self, prompts):
        return [g.token_ids for g in self.policy.generate(prompts, SamplingParams(greedy=True, max_new_tokens=10))]

    return ray.get(worker.__ray_call__.remote(generate, prompts), timeout=300)


def test_a_ray_group_of_vllm_workers_survives_a_killed_worker(ray_cluster, student, tiny_tokenizer, prompts):
    """Each worker's engine receives from this process through its own gloo transfer group; a worker killed
    mid-request is replaced, its new engine forms a new group and gets the current weights, and the next sync
    reaches every worker."""
    import ray

    from opd_agents.rollout import RolloutGroup
    from tests.rollout.test_toyenv import ENV_ID

    rollout = RolloutConfig(backend="vllm", num_workers=2, num_cpus_per_worker=1, max_concurrent_episodes=2,
                            max_restarts=1, start_timeout_s=400, call_timeout_s=400, vllm=ENGINE)
    group = RolloutGroup(ModelConfig(path=str(student[0])), rollout, imports=[TOY], seed=0)
    try:
        assert group.rollout_cfg.weight_transfer == "gloo"
        stop = {tiny_tokenizer.eos_token_id, student[1]}
        new = build_tiny_model(tiny_tokenizer, SIZE, seed=5)
        group.sync_weights(new.state_dict(), version=1)
        assert ray.get([w.version.remote() for w in group.workers], timeout=60) == [1, 1]
        slow = TaskConfig(name="slow", env_id=ENV_ID, teacher="t", max_new_tokens=4, max_turns=2,
                          env_kwargs={"step_delay": 1.5})
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(
            batch=group.rollout(slow, num_prompts=2, group_size=2, seed=2)))
        victim = group.workers[0]
        thread.start()
        time.sleep(1.0)  # each worker's request takes >= 2 turns × 1.5 s: it is in flight now
        ray.kill(victim)
        thread.join(timeout=600)
        batch = result["batch"]
        assert len(batch.episodes) == 4 and batch.metrics["rollout/worker_restarts"] == 1
        assert group.workers[0] != victim
        assert all(s.metadata["weight_version"] == 1 for s in batch.samples)
        # The replacement holds the current weights (version 1), received through its new group.
        assert ray.get(group.workers[0].version.remote(), timeout=60) == 1
        assert worker_greedy(group.workers[0], prompts) == [hf_greedy(new, p, 10, stop) for p in prompts]

        newer = build_tiny_model(tiny_tokenizer, SIZE, seed=6)
        group.sync_weights({k: v.detach().clone() for k, v in newer.state_dict().items()}, version=2)
        assert ray.get([w.version.remote() for w in group.workers], timeout=60) == [2, 2]
        want = [hf_greedy(newer, p, 10, stop) for p in prompts]
        assert [worker_greedy(w, prompts) for w in group.workers] == [want, want]
        batch = group.rollout(slow, num_prompts=1, group_size=2, seed=3)
        assert batch.samples and all(s.metadata["weight_version"] == 2 for s in batch.samples)

        # A worker that died between syncs fails the next sync: it is replaced, and its new engine gets that sync.
        gone = group.workers[1]
        ray.kill(gone)
        group.sync_weights({k: v.detach().clone() for k, v in new.state_dict().items()}, version=3)
        assert group.workers[1] != gone
        assert ray.get([w.version.remote() for w in group.workers], timeout=60) == [3, 3]
        want = [hf_greedy(new, p, 10, stop) for p in prompts]
        assert [worker_greedy(w, prompts) for w in group.workers] == [want, want]
    finally:
        group.shutdown()


def run_data(root: Path, student: Path, teacher: Path, name: str, steps: int, task: dict) -> dict:
    """A seconds-sized run: vLLM rollouts (one Ray worker) and a vLLM teacher, a checkpoint every step."""
    return {
        "run": {"name": name, "output_dir": str(root), "steps": steps, "save_every": 1, "device": "cpu", "seed": 3},
        "student": {"path": str(student)},
        "rollout": {"backend": "vllm", "num_workers": 1, "prompts_per_step": 2, "group_size": 2,
                    "max_concurrent_episodes": 4, "start_timeout_s": 400, "call_timeout_s": 400, "vllm": ENGINE},
        "teachers": {"t": {"backend": "vllm", "model": str(teacher),
                           "options": {"enforce_eager": True, "max_model_len": 2048, "max_logprobs": 32}}},
        "tasks": [{"teacher": "t", "eval_episodes": 2, **task}],
        "optim": {"lr": 1e-3},
        "loss": {"k": 8},
        "eval": {"teacher_reference": False},
        "logging": {"tensorboard": False, "progress": False},
        "ray": {"num_cpus": 2},
    }


@pytest.fixture(scope="module")
def teacher_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    return save_model(tiny_tokenizer, tmp_path_factory.mktemp("vllm_train") / "teacher", seed=1)


@pytest.fixture
def fresh_ray():
    """The trainer starts its own Ray cluster: none may be running before, and it is shut down after."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def fit(data: dict, resume: bool = False) -> Path:
    from opd_agents.config import build_config
    from opd_agents.run.rundir import RunDir
    from opd_agents.run.trainer import Trainer

    cfg = build_config(data, [])
    run_dir = RunDir.for_config(cfg)
    if not resume:
        run_dir.create(cfg, resume=False)
    Trainer(cfg, run_dir, resume=resume).fit()
    return Path(data["run"]["output_dir"]) / data["run"]["name"]


def train_steps(run: Path) -> list[int]:
    from opd_agents.run.metrics import read_metrics

    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


def test_math_training_with_vllm_rollouts_and_teacher_resumes(fresh_ray, tmp_path, student, teacher_dir):
    import json

    task = {"name": "math", "env_id": "opd/Math-v0", "max_new_tokens": 6, "env_kwargs": {"num_problems": 20}}
    run = fit(run_data(tmp_path, student[0], teacher_dir, "math", 2, task))
    assert train_steps(run) == [1, 2]
    run = fit(run_data(tmp_path, student[0], teacher_dir, "math", 3, task), resume=True)
    assert train_steps(run) == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_3"
    final = json.loads((run / "eval.json").read_text())["final"]["math"]
    assert final["episodes"] == 2.0 and 0.0 <= final["success"] <= 1.0


def test_alfworld_per_turn_training_with_vllm(fresh_ray, tmp_path, student, teacher_dir):
    from envs.alfworld.generate import main as generate_games

    games = tmp_path / "games"
    assert generate_games(["--out", str(games), "--n", "2", "--split", "train", "--split", "eval_in_distribution",
                           "--workers", "1"]) in (0, None)
    task = {"name": "alfworld", "env_id": "opd/ALFWorld-v0", "max_new_tokens": 8, "max_turns": 2,
            "sample_mode": "per_turn", "env_kwargs": {"data_path": str(games)},
            "eval_env_kwargs": {"split": "eval_in_distribution"}}
    run = fit(run_data(tmp_path, student[0], teacher_dir, "alfworld", 2, task))
    assert train_steps(run) == [1, 2]
