"""N learner ranks as Ray actors forming one `torch.distributed` group, behind the in-process Learner's API.

`LearnerGroup(cfg, model_path)` starts `learner.num_workers` actors (resources from `learner.*`), rank 0 picks the
rendezvous address (its node IP and a free port), every rank joins the group (`gloo` on CPU, `nccl` on CUDA) and
builds a `DistributedLearner`. The ranks are placed in one Ray placement group (`learner.placement`: PACK by
default, STRICT_PACK for one node). Collective methods (update, weights, state, load_state, save_pretrained) are sent to
every rank at once and rank 0's answer is returned. `save_pretrained` writes from rank 0: on a multi-node cluster
the run directory must be on a filesystem rank 0's node shares with the driver.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import AutoTokenizer

from opd_agents.config import Config
from opd_agents.samples import Sample, TeacherTopK


class LearnerRank:
    """One rank: joins the process group, then holds a DistributedLearner."""

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, cfg: Config, model_path: str, adapter: str | None, rank: int, world: int, addr: str, port: int,
              ) -> int:
        import torch.distributed as dist

        from opd_agents.learner.distributed import DistributedLearner

        use_cuda = cfg.learner.num_gpus_per_worker > 0 and torch.cuda.is_available()
        if not use_cuda and cfg.learner.num_cpus_per_worker >= 1:
            torch.set_num_threads(int(cfg.learner.num_cpus_per_worker))
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=world)
        self.learner = DistributedLearner(cfg, model_path, cfg.learner.strategy, adapter)
        return self.learner.vocab_size

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.learner, method)(*args)

    def save_pretrained(self, path: str) -> None:
        if self.learner.strategy == "ddp":  # replicated: rank 0 alone holds everything (LoRA adapters included)
            if self.learner.rank == 0:
                self.learner.save_pretrained(path)
            return
        self.learner.save_sharded_optimizer(path)  # collective: every rank writes its shards
        full = self.learner.weights()  # collective
        if self.learner.rank == 0:
            self.learner.model.save_pretrained(path, state_dict=full)
            self.learner.tokenizer.save_pretrained(path)


class LearnerGroup:
    """The distributed learner behind `api.LearnerAPI`, like the in-process Learner."""

    def __init__(self, cfg: Config, model_path: str, adapter_path: str | None = None) -> None:
        lc = cfg.learner
        bundle = {"CPU": lc.num_cpus_per_worker, **({"GPU": lc.num_gpus_per_worker} if lc.num_gpus_per_worker else {})}
        self.placement = placement_group([bundle] * lc.num_workers, strategy=lc.placement)
        ray.get(self.placement.ready())
        actor = ray.remote(num_cpus=lc.num_cpus_per_worker, num_gpus=lc.num_gpus_per_worker)(LearnerRank)
        path = os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
        env = {"env_vars": {"PYTHONPATH": path}}
        self.ranks = [actor.options(runtime_env=env, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placement, placement_group_bundle_index=i)).remote() for i in range(lc.num_workers)]
        addr, port = ray.get(self.ranks[0].address.remote())
        sizes = ray.get([r.setup.remote(cfg, model_path, adapter_path, i, lc.num_workers, addr, port)
                         for i, r in enumerate(self.ranks)])
        self.vocab_size = sizes[0]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.student.trust_remote_code)

    def _all(self, method: str, *args: Any) -> Any:
        refs = [ray.put(a) for a in args]
        return ray.get([r.call.remote(method, *refs) for r in self.ranks])[0]

    def update(self, samples: list[Sample], teacher: list[TeacherTopK], lr_scale: float = 1.0) -> dict[str, float]:
        return self._all("update", samples, teacher, lr_scale)

    def student_topk_ids(self, samples: list[Sample], k: int) -> list[torch.Tensor]:
        return ray.get(self.ranks[0].call.remote("student_topk_ids", samples, k))

    def weights(self) -> dict[str, torch.Tensor]:
        return self._all("weights")

    def state(self) -> dict[str, Any]:
        return self._all("state")

    def load_state(self, state: dict[str, Any], folder: str | Path | None = None) -> None:
        self._all("load_state", state, None if folder is None else str(folder))

    def save_pretrained(self, path: str | Path) -> None:
        ray.get([r.save_pretrained.remote(str(path)) for r in self.ranks])

    def shutdown(self) -> None:
        """Kill the ranks and release their placement group (idempotent)."""
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None
