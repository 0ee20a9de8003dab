"""Precision and memory of the learner's update (issue 40): float32 master weights and optimizer state with the
forward in the compute dtype, so a bf16 run at the paper's lr of 1e-6 moves the weights as a float32 run does (pure
bf16 AdamW rounds most of those updates away); checkpoints written before that still resume; 2 FSDP2 ranks with the
mixed-precision policy keep float32 master shards and update as one process; gradient checkpointing changes no loss
or gradient."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner.group import LearnerGroup
from opd_agents.learner.learner import Learner, is_checkpointing
from tests.learner.test_learner import _cfg, _samples, _sharp_teacher, _teacher

LR = 1e-6


def _one_step(model_dir, samples, outs, **over) -> tuple[Learner, dict[str, torch.Tensor]]:
    learner = Learner(_cfg(model_dir, **{"optim.lr": LR, "loss.k": 8, **over}), str(model_dir))
    before = {n: p.detach().double().clone() for n, p in learner.model.named_parameters()}
    learner.update(samples, outs)
    return learner, {n: p.detach().double() - before[n] for n, p in learner.model.named_parameters()}


@pytest.fixture(scope="module")
def batch(tiny_model_dirs, tiny_tokenizer):
    samples = _samples(tiny_tokenizer, 4)
    return samples, _teacher(_sharp_teacher(tiny_model_dirs["teacher"]), samples, 8)


def test_bf16_compute_moves_the_float32_master_weights_as_a_float32_run(tiny_model_dirs, batch):
    samples, outs = batch
    _, full = _one_step(tiny_model_dirs["student"], samples, outs, **{"student.dtype": "float32"})
    learner, mixed = _one_step(tiny_model_dirs["student"], samples, outs, **{"student.dtype": "bfloat16"})
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(v.dtype == torch.float32 for st in learner.optimizer.state.values() for k, v in st.items()
               if k != "step")

    def changed(delta: dict[str, torch.Tensor]) -> float:
        return sum(int((d != 0).sum()) for d in delta.values()) / sum(d.numel() for d in delta.values())

    def mean_abs(delta: dict[str, torch.Tensor]) -> float:
        return float(sum(d.abs().sum() for d in delta.values()) / sum(d.numel() for d in delta.values()))

    assert changed(full) > 0.5  # all but the embedding rows of tokens absent from the batch
    assert changed(mixed) == pytest.approx(changed(full), rel=0.01)
    assert mean_abs(mixed) == pytest.approx(mean_abs(full), rel=0.01)
    gains = [n for n in mixed if "norm" in n]
    assert gains and all(bool((mixed[n] != 0).all()) for n in gains)  # RMSNorm gains (~1) move by ~1e-6 too
    weights = learner.weights()  # what rollout workers and exports receive: the compute dtype
    assert all(v.dtype == torch.bfloat16 for k, v in weights.items() if v.is_floating_point())


def test_a_checkpoint_of_bf16_weights_and_bf16_adam_state_still_resumes(tiny_model_dirs, batch, tmp_path):
    """A checkpoint written before the master weights: a bf16 model folder and AdamW state over bf16 parameters."""
    samples, outs = batch
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"], dtype=torch.bfloat16)
    opt = torch.optim.AdamW(old.parameters(), lr=LR)
    old(torch.tensor([samples[0].input_ids])).logits.float().mean().backward()
    opt.step()
    ckpt = tmp_path / "step_1"
    old.save_pretrained(ckpt)
    Learner(_cfg(tiny_model_dirs["student"]), str(tiny_model_dirs["student"])).tokenizer.save_pretrained(ckpt)
    cfg_over = {"student.dtype": "bfloat16", "optim.lr": LR, "loss.k": 8}
    fresh = Learner(_cfg(tiny_model_dirs["student"], **cfg_over), str(tiny_model_dirs["student"]))
    state = {**fresh.state(), "optimizer": opt.state_dict()}

    resumed = Learner(_cfg(tiny_model_dirs["student"], **cfg_over), str(ckpt))
    resumed.load_state(copy.deepcopy(state), ckpt)
    assert all(p.dtype == torch.float32 for p in resumed.model.parameters())
    for p, (_, saved) in zip(resumed.model.parameters(), sorted(opt.state_dict()["state"].items())):
        st = resumed.optimizer.state[p]
        assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], saved["exp_avg"].float())
    before = [p.detach().clone() for p in resumed.model.parameters()]
    resumed.update(samples, outs)
    assert any(not torch.equal(a, p) for a, p in zip(before, resumed.model.parameters()))


def test_two_fsdp_ranks_with_the_policy_keep_float32_masters_and_update_as_one_process(
        ray_cluster, tiny_model_dirs, batch):
    samples, outs = batch
    over = {"student.dtype": "bfloat16", "optim.lr": LR, "loss.k": 8, "learner.num_cpus_per_worker": 0.5,
            "learner.strategy": "fsdp", "optim.micro_batch_tokens": 64}
    single = Learner(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
    start = {k: v.double() for k, v in single.model.state_dict().items()}
    group = LearnerGroup(_cfg(tiny_model_dirs["student"], **over, **{"learner.num_workers": 2}),
                         str(tiny_model_dirs["student"]))
    try:
        single.update(samples, outs)
        group.update(samples, outs)
        master = group._all("master_state")
        assert master and all(v.dtype == torch.float32 for v in master.values())
        assert all(v.dtype == torch.bfloat16 for v in group.weights().values() if v.is_floating_point())
    finally:
        group.shutdown()
    one = {k: v.double() - start[k] for k, v in single.model.state_dict().items()}
    two = {k: master[k].double() - start[k] for k in one}
    # The same update to the rounding of bf16 compute and of the reduction order: Adam's first step is ~lr·sign(g),
    # so the updates agree wherever a gradient is clear of its rounding.
    diff = sum(float((one[k] - two[k]).abs().sum()) for k in one)
    size = sum(float(one[k].abs().sum()) for k in one)
    assert diff <= 0.01 * size
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 2.5 * LR


@pytest.mark.parametrize("loss", ["topk_reverse_kl", "sampled_token_opd"])
def test_gradient_checkpointing_changes_no_loss_or_gradient(tiny_model_dirs, batch, loss):
    samples, outs = batch
    grads, losses = [], []
    for on in (False, True):
        learner = Learner(_cfg(tiny_model_dirs["student"], **{"loss.name": loss, "loss.k": 8,
                                                               "learner.gradient_checkpointing": on,
                                                               "optim.micro_batch_tokens": 64}),
                          str(tiny_model_dirs["student"]))
        assert is_checkpointing(learner.model) == on
        learner.optimizer.step = lambda: None  # compare the accumulated gradients themselves
        losses.append(learner.update(samples, outs)["loss"])
        grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters()})
    assert losses[0] == losses[1]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-7)


def test_gradient_checkpointing_defaults_on_for_cuda_only(tiny_model_dirs):
    learner = Learner(_cfg(tiny_model_dirs["student"]), str(tiny_model_dirs["student"]))
    assert learner.cfg.learner.gradient_checkpointing is None and not is_checkpointing(learner.model)
