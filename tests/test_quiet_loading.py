"""Progress bars: off while a small local checkpoint loads and while checkpoints are written, restored after; a big
checkpoint or a hub id keeps transformers' default."""
from __future__ import annotations

from transformers.utils import logging as hf_logging

from opd_agents import quiet_loading


def test_small_loads_and_saves_are_quiet_and_the_setting_comes_back(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    hf_logging.enable_progress_bar()
    with quiet_loading.load_progress(tmp_path):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with quiet_loading.no_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with quiet_loading.load_progress("Qwen/Qwen2.5-7B-Instruct"):  # a hub id: transformers decides
        assert hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(quiet_loading, "QUIET_BELOW_BYTES", 50)
    with quiet_loading.load_progress(tmp_path):  # a checkpoint worth watching
        assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a user who turned them off keeps them off
    with quiet_loading.no_progress_bars():
        pass
    assert not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
