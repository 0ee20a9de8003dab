"""Optimizer-state formats, so checkpoints move between 1 process and N ranks.

The checkpoint format is torch's own `optimizer.state_dict()` (state keyed by parameter index in
`module.parameters()` order). torch.distributed's state-dict API keys the same state by parameter name (FQN);
these helpers convert between the two, and read a sharded (DCP) optimizer checkpoint back whole.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

# Sub-folder of a checkpoint holding FSDP optimizer shards (torch.distributed.checkpoint format).
OPTIM_DCP = "optimizer_dcp"


def fqns(module: torch.nn.Module) -> list[str]:
    """Parameter names in `module.parameters()` order (the optimizer's index order)."""
    return [name for name, _ in module.named_parameters()]


def fqn_to_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def index_to_fqn(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def load_dcp_whole(folder: str | Path) -> dict[str, Any]:
    """A sharded (DCP) optimizer checkpoint as one FQN-keyed state dict, in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "whole.pt")
        # The converted file holds tensors and plain values only: loaded without unpickling. (DCP itself still reads
        # its `.metadata` with pickle; README "Reliability" names that as the one pickle left, fsdp resume only.)
        return torch.load(Path(tmp) / "whole.pt", weights_only=True)["optim"]
