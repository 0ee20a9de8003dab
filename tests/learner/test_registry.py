"""The loss registry: specs of the built-in losses, errors naming the registered losses, and a loss added from
outside the package (tests/learner/custom_loss.py via `run.imports`) training through the real entry point."""
from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from opd_agents.config import ConfigError, LossConfig, build_config
from opd_agents.learner.registry import get_loss, register_loss, registered_losses
from opd_agents.run.preflight import check_references
from opd_agents.train import main as train_main
from tests.run.test_train_e2e import tiny_run_data


@pytest.mark.parametrize("over, query, full, union", [
    ({}, "topk", False, False),
    ({"renormalize": False}, "topk", True, False),
    ({"support": "student_topk"}, "score", False, False),
    ({"support": "teacher_topk_union_sampled"}, "topk", False, True),
    ({"name": "sampled_token_opd"}, "topk", True, False),
    ({"name": "sampled_token_opd", "support": "teacher_topk_union_sampled"}, "topk", True, False),
    ({"name": "full_reverse_kl"}, "full", True, False),
])
def test_builtin_specs_say_what_each_loss_needs(over, query, full, union):
    lc = LossConfig(**over)
    spec = get_loss(lc.name)
    assert (spec.teacher_query(lc), spec.needs_full_logits(lc), spec.union_sampled(lc)) == (query, full, union)
    assert spec.uses_support_logits(lc) is not full
    assert not spec.uses_support_logits(lc.model_copy(update={"student_logits": "full"}))


def test_unknown_loss_lists_the_registered_ones(tiny_model_dirs, tmp_path):
    cfg = build_config(tiny_run_data(tmp_path, tiny_model_dirs, "x", 1), ["loss.name=topk_revers_kl"])
    with pytest.raises(ConfigError, match="unknown loss 'topk_revers_kl'.*'full_reverse_kl'.*'sampled_token_opd'"):
        check_references(cfg)
    with pytest.raises(KeyError, match="registered losses"):
        get_loss("nope")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("topk_reverse_kl")(lambda x, lc: (None, {}))


def test_a_loss_from_outside_the_package_trains_a_step(tiny_model_dirs, tmp_path):
    data = tiny_run_data(tmp_path, tiny_model_dirs, "custom", 1)
    data["run"] |= {"imports": ["tests.learner.custom_loss"], "eval_before": False}
    data["loss"] |= {"name": "topk_forward_kl", "options": {"weight": 2.0}}
    config = tmp_path / "custom.yaml"
    config.write_text(yaml.safe_dump(data))
    assert train_main([str(config)]) == 0
    assert "topk_forward_kl" in registered_losses()
    run = tmp_path / "custom"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "train/loss" in r)
    assert step["train/loss"] == pytest.approx(2.0 * step["train/forward_kl"], rel=1e-5) and step["train/loss"] > 0
    before = load_file(tiny_model_dirs["student"] / "model.safetensors")
    after = load_file(run / "checkpoints" / "step_1" / "model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in after if k in before)
