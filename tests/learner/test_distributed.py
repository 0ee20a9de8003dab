"""Data-parallel learner on a Ray local cluster with gloo: 2 ranks (ddp and fsdp) reach the same parameters as one
process on the same global batch; optimizer state written by 2 ranks resumes on 1; weights export loads back."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner.distributed import process_group_backend, split_by_tokens
from opd_agents.learner.group import LearnerGroup, to_cpu
from opd_agents.learner.learner import Learner
from tests.learner.test_learner import _cfg, _samples, _sharp_teacher, _teacher

# Summation order differs between 1 and 2 ranks; Adam turns ~1e-7 gradient noise on near-zero gradients into up to
# ~1e-3 of a step (lr 1e-2 in these configs): parameters agree to half a percent of one optimizer step.
ATOL = 5e-5


def test_split_by_tokens_balances_and_covers():
    shares = split_by_tokens([0, 1, 2, 3, 4], [10, 1, 9, 2, 8], 2)
    assert sorted(i for s in shares for i in s) == [0, 1, 2, 3, 4]
    assert shares == [[0, 1, 3], [2, 4]]  # longest first to the lighter rank: loads 13 and 17
    assert split_by_tokens([0], [5], 3) == [[0], [], []]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(ray_cluster, tiny_model_dirs, tiny_tokenizer, strategy, tmp_path):
    samples = _samples(tiny_tokenizer, 5)
    outs = _teacher(_sharp_teacher(tiny_model_dirs["teacher"]), samples, 8)
    over = {"loss.k": 8, "learner.num_cpus_per_worker": 0.5, "learner.strategy": strategy,
            "optim.micro_batch_tokens": 64}
    single = Learner(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
    group = LearnerGroup(_cfg(tiny_model_dirs["student"], **over, **{"learner.num_workers": 2}),
                         str(tiny_model_dirs["student"]))
    try:
        for _ in range(2):
            m1 = single.update(samples, outs)
            m2 = group.update(samples, outs)
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        got = group.weights()
        for key, value in single.weights().items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=ATOL)

        # A checkpoint written by 2 ranks (fsdp: sharded optimizer state) continues on 1 process, and on 2 ranks
        # again, exactly like the single process's own next step.
        ckpt = tmp_path / "ckpt"
        group.save_pretrained(ckpt)
        state = copy.deepcopy(group.state())
        resumed = Learner(_cfg(tiny_model_dirs["student"], **over), str(ckpt))
        resumed.load_state(state, ckpt)
        regrouped = LearnerGroup(_cfg(tiny_model_dirs["student"], **over, **{"learner.num_workers": 2}), str(ckpt))
        regrouped.load_state(state, ckpt)
        single.update(samples, outs)
        resumed.update(samples, outs)
        regrouped.update(samples, outs)
        again = regrouped.weights()
        regrouped.shutdown()
        for key, value in single.weights().items():
            torch.testing.assert_close(resumed.weights()[key], value, rtol=1e-4, atol=ATOL)
            torch.testing.assert_close(again[key], value, rtol=1e-4, atol=ATOL)
    finally:
        group.shutdown()


@torch.no_grad()
def _near_behaviour(samples, student_dir):
    """The samples with behaviour log-probs near the student's own (its untempered log-prob + N(0, 0.5²) noise): stale
    samples whose importance weights spread around 1."""
    model, g = AutoModelForCausalLM.from_pretrained(student_dir), torch.Generator().manual_seed(0)
    for s in samples:
        logp = torch.log_softmax(model(torch.tensor([s.input_ids])).logits[0].float(), -1)
        for p in s.loss_positions():
            s.behaviour_logprobs[p] = float(logp[p - 1, s.input_ids[p]]) + 0.5 * float(torch.randn(1, generator=g))
    return samples


def test_old_policy_pass_and_per_sample_entropy_on_two_fsdp_ranks_match_one_process(ray_cluster, tiny_model_dirs,
                                                                                     tiny_tokenizer):
    """Sampled-token OPD's old-policy pass (sharded forwards are collective: every rank runs its padding micro-batches
    too), the per-sample entropy selection, which no rank boundary changes, and the off-policy correction's pass, whose
    per-turn offsets are summed over ranks (two samples are turns of one episode)."""
    samples = _near_behaviour(_samples(tiny_tokenizer, 5), tiny_model_dirs["student"])
    for turn, s in enumerate(samples[:2]):
        s.episode_id, s.metadata = "e", {"turn": turn}
    outs = _teacher(_sharp_teacher(tiny_model_dirs["teacher"]), samples, 8)
    over = {"loss.k": 8, "loss.name": "sampled_token_opd", "loss.entropy_top_ratio": 0.5, "rollout.top_p": 1.0,
            "loss.off_policy_correction": "truncate", "loss.importance_cap": 3.0,
            "learner.num_cpus_per_worker": 0.5, "learner.strategy": "fsdp", "optim.micro_batch_tokens": 64}
    single = Learner(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
    group = LearnerGroup(_cfg(tiny_model_dirs["student"], **over, **{"learner.num_workers": 2}),
                         str(tiny_model_dirs["student"]))
    try:
        for _ in range(2):
            m1, m2 = single.update(samples, outs), group.update(samples, outs)
            assert m2["tokens"] == m1["tokens"] < sum(s.num_loss_tokens for s in samples)
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4)
            offpolicy = {k: v for k, v in m1.items() if k.startswith("offpolicy/")}
            assert 0 < offpolicy["offpolicy/outside_cap_fraction"] < 1 and offpolicy["offpolicy/ess_fraction"] < 1
            assert all(m2[k] == pytest.approx(v, rel=1e-4, abs=1e-7) for k, v in offpolicy.items())
        got = group.weights()
        for key, value in single.weights().items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=ATOL)
    finally:
        group.shutdown()


def test_export_from_two_ranks_loads_with_from_pretrained(ray_cluster, tiny_model_dirs, tiny_tokenizer, tmp_path):
    over = {"loss.k": 8, "learner.num_cpus_per_worker": 0.5, "learner.strategy": "fsdp", "learner.num_workers": 2}
    group = LearnerGroup(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
    try:
        samples = _samples(tiny_tokenizer, 3)
        group.update(samples, _teacher(_sharp_teacher(tiny_model_dirs["teacher"]), samples, 8))
        group.save_pretrained(tmp_path / "export")
        weights = group.weights()
    finally:
        group.shutdown()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key], value)


def test_ranks_the_cluster_cannot_place_are_a_clear_error(ray_cluster, tiny_model_dirs):
    from opd_agents.learner.group import LearnerError

    over = {"learner.num_workers": 2, "learner.num_cpus_per_worker": 64, "learner.timeout_s": 3}
    with pytest.raises(LearnerError, match=r"cannot place 2 learner rank\(s\).*timeout_s = 3 s"):
        LearnerGroup(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))


def test_collectives_and_ray_returns_are_device_correct_by_construction():
    """On CUDA the group serves CPU tensors over gloo and CUDA ones over nccl (NCCL raises on a CPU tensor: the token
    counts and metric sums are CPU tensors), and whatever a rank returns through Ray is on the CPU."""
    assert process_group_backend(use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(use_cuda=False) == "gloo"
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2, requires_grad=True)}}, "param_groups": [{"lr": 1}]},
             "pair": (torch.zeros(1), 3), "list": [torch.ones(1)], "step": 5}
    moved = to_cpu(state)
    assert moved["step"] == 5 and moved["optimizer"]["param_groups"] == [{"lr": 1}] and isinstance(moved["pair"], tuple)
    tensors = [moved["optimizer"]["state"][0]["exp_avg"], moved["pair"][0], moved["list"][0]]
    assert all(t.device.type == "cpu" and not t.requires_grad for t in tensors)


@pytest.mark.slow
def test_hsdp_on_a_2x2_mesh_equals_flat_fsdp_over_4_ranks(ray_cluster, tiny_model_dirs, tiny_tokenizer):
    """The 2-node layout in miniature: shard within a replica of 2 ranks, replicate across 2 replicas."""
    samples = _samples(tiny_tokenizer, 6)
    outs = _teacher(_sharp_teacher(tiny_model_dirs["teacher"]), samples, 8)
    over = {"loss.k": 8, "learner.num_cpus_per_worker": 0.5, "learner.strategy": "fsdp", "learner.num_workers": 4,
            "optim.micro_batch_tokens": 64}
    results = []
    for replicas in (1, 2):
        group = LearnerGroup(_cfg(tiny_model_dirs["student"], **over, **{"learner.replicas": replicas}),
                             str(tiny_model_dirs["student"]))
        try:
            metrics = [group.update(samples, outs) for _ in range(2)]
            results.append((metrics, group.weights()))
        finally:
            group.shutdown()
    (flat_metrics, flat), (hsdp_metrics, hsdp) = results
    for a, b in zip(flat_metrics, hsdp_metrics):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=1e-4)
    for key, value in flat.items():
        torch.testing.assert_close(hsdp[key], value, rtol=1e-4, atol=ATOL)
