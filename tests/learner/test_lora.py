"""LoRA student: only adapters train, rollouts/exports get merged weights under base names, and a checkpoint's
adapter resumes the same function and optimizer trajectory."""
from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner.learner import Learner
from opd_agents.learner.lora import ADAPTER_DIR
from tests.learner.test_learner import _cfg, _samples, _sharp_teacher, _teacher

LORA = {"learner.lora": "{r: 4, alpha: 8}", "loss.k": 8}


def test_lora_trains_adapters_and_exports_merged_weights(tiny_model_dirs, tiny_tokenizer, tmp_path):
    samples = _samples(tiny_tokenizer, 3)
    outs = _teacher(_sharp_teacher(tiny_model_dirs["teacher"]), samples, 8)
    learner = Learner(_cfg(tiny_model_dirs["student"], **LORA), str(tiny_model_dirs["student"]))
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"]).state_dict()
    first = learner.update(samples, outs)
    for _ in range(5):
        last = learner.update(samples, outs)
    assert last["loss"] < first["loss"]

    weights = learner.weights()
    assert set(weights) == set(base)  # base parameter names: rollout workers load them as a plain model
    assert any(not torch.equal(weights[k], base[k]) for k in base)

    learner.save_pretrained(tmp_path / "ckpt")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, learner.model(ids).logits, rtol=1e-4, atol=1e-5)

    resumed = Learner(_cfg(tiny_model_dirs["student"], **LORA), str(tiny_model_dirs["student"]),
                      adapter_path=tmp_path / "ckpt" / ADAPTER_DIR)
    resumed.load_state(copy.deepcopy(learner.state()))  # a copy, as a checkpoint file would give
    learner.update(samples, outs)
    resumed.update(samples, outs)
    for key, value in learner.weights().items():
        torch.testing.assert_close(resumed.weights()[key], value, rtol=1e-5, atol=1e-6)
