"""N learner ranks as Ray actors forming one `torch.distributed` group, behind the in-process Learner's API.

`LearnerGroup(cfg, model_path)` starts `learner.num_workers` actors (resources from `learner.*`), rank 0 picks the
rendezvous address (its node IP and a free port), every rank joins the group (`gloo` on CPU; on CUDA
`cpu:gloo,cuda:nccl`, each collective on the backend of its tensors' device) and builds a `DistributedLearner`; what a
rank returns through Ray is on the CPU (`to_cpu`). The ranks are placed in one Ray placement group
(`learner.placement`: PACK by default, STRICT_PACK for one node), or, for HSDP (`learner.replicas`), one STRICT_PACK
group per replica. Collective methods (update, weights, state, load_state, save_pretrained) are sent to every rank at
once and rank 0's answer is returned. `save_pretrained` writes from rank 0: on a multi-node cluster the run directory
must be on a filesystem rank 0's node shares with the driver.

Every wait is bounded by `learner.timeout_s`: the placement group (ranks the cluster cannot place), each call, and the
process group's collectives (a rank that dies or hangs mid-collective). A dead or stuck rank stops the run with a
`LearnerError` (the ranks share one optimizer state, so one cannot be replaced alone; resume from the last
checkpoint). On a one-node cluster the rendezvous store listens on loopback only.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import AutoTokenizer

from opd_agents.config import Config
from opd_agents.samples import Sample, TeacherTopK


class LearnerError(RuntimeError):
    """A learner rank could not be placed, died, or did not answer within learner.timeout_s."""


def to_cpu(value: Any) -> Any:
    """`value` with every tensor inside (dicts, lists, tuples) moved to the CPU: what a rank returns through Ray, so a
    CUDA tensor never lands on the driver's GPU when Ray deserialises it."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


class LearnerRank:
    """One rank: joins the process group, then holds a DistributedLearner."""

    def address(self, loopback: bool) -> tuple[str, int]:
        """Rank 0's rendezvous address: loopback when every rank is on this node, else the node's IP."""
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return host, port

    def setup(self, cfg: Config, model_path: str, adapter: str | None, rank: int, world: int, addr: str, port: int,
              ) -> int:
        import torch.distributed as dist

        from opd_agents.learner.distributed import DistributedLearner, process_group_backend

        use_cuda = cfg.learner.num_gpus_per_worker > 0 and torch.cuda.is_available()
        if use_cuda:  # Ray shows a rank only its own GPU(s) (CUDA_VISIBLE_DEVICES): the first is this rank's
            torch.cuda.set_device(0)
        elif cfg.learner.num_cpus_per_worker >= 1:
            torch.set_num_threads(int(cfg.learner.num_cpus_per_worker))
        dist.init_process_group(process_group_backend(use_cuda), init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=cfg.learner.timeout_s))
        self.learner = DistributedLearner(cfg, model_path, cfg.learner.strategy, adapter)
        return self.learner.vocab_size

    def call(self, method: str, *args: Any) -> Any:
        return to_cpu(getattr(self.learner, method)(*args))

    def save_pretrained(self, path: str) -> None:
        if self.learner.strategy == "ddp":  # replicated: rank 0 alone holds everything (LoRA adapters included)
            if self.learner.rank == 0:
                self.learner.save_pretrained(path)
            return
        self.learner.save_sharded_optimizer(path)  # collective: every rank writes its shards
        full = self.learner.master_state()  # collective
        if self.learner.rank == 0:
            self.learner.model.save_pretrained(path, state_dict=full)
            self.learner.tokenizer.save_pretrained(path)


class LearnerGroup:
    """The distributed learner behind `api.LearnerAPI`, like the in-process Learner."""

    def __init__(self, cfg: Config, model_path: str, adapter_path: str | None = None) -> None:
        lc = cfg.learner
        self.timeout_s = lc.timeout_s
        self.ranks: list[Any] = []
        bundle = {"CPU": lc.num_cpus_per_worker, **({"GPU": lc.num_gpus_per_worker} if lc.num_gpus_per_worker else {})}
        # HSDP: one placement group per replica, all on one node (its ranks shard among themselves over the node's
        # links); consecutive ranks form a replica, as the device mesh expects.
        per, strategy = lc.num_workers // lc.replicas, "STRICT_PACK" if lc.replicas > 1 else lc.placement
        self.placements = [placement_group([bundle] * per, strategy=strategy) for _ in range(lc.replicas)]
        try:
            self._get([pg.ready() for pg in self.placements], "placing the ranks")
        except LearnerError:
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            self.shutdown()
            raise LearnerError(f"the cluster cannot place {lc.num_workers} learner rank(s) of {bundle} "
                               f"({lc.replicas} × {per}, {strategy}) within learner.timeout_s = {lc.timeout_s:g} s; "
                               f"available: {have}. Lower learner.num_workers or the per-rank resources.") from None
        actor = ray.remote(num_cpus=lc.num_cpus_per_worker, num_gpus=lc.num_gpus_per_worker)(LearnerRank)
        path = os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
        env = {"env_vars": {"PYTHONPATH": path}}
        self.ranks = [actor.options(runtime_env=env, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placements[i // per], placement_group_bundle_index=i % per)).remote() for i in range(lc.num_workers)]
        one_node = sum(1 for node in ray.nodes() if node["Alive"]) == 1
        try:
            addr, port = self._get(self.ranks[0].address.remote(one_node), "rendezvous")
            sizes = self._get([r.setup.remote(cfg, model_path, adapter_path, i, lc.num_workers, addr, port)
                               for i, r in enumerate(self.ranks)], "start-up")
        except BaseException:
            self.shutdown()
            raise
        self.vocab_size = sizes[0]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.student.trust_remote_code)

    def _get(self, refs: Any, what: str) -> Any:
        """`ray.get` bounded by learner.timeout_s; a dead or silent rank is a LearnerError."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise LearnerError(f"learner {what} did not finish within learner.timeout_s = {self.timeout_s:g} s (a "
                               "stuck or unschedulable rank); resume from the last checkpoint, or raise "
                               "learner.timeout_s") from None
        except ray.exceptions.RayActorError as exc:
            raise LearnerError(f"a learner rank died during {what}: {exc}. Resume from the last checkpoint "
                               "(python -m opd_agents.train CONFIG --resume)") from None

    def _all(self, method: str, *args: Any) -> Any:
        refs = [ray.put(a) for a in args]
        return self._get([r.call.remote(method, *refs) for r in self.ranks], method)[0]

    def update(self, samples: list[Sample], teacher: list[TeacherTopK], lr_scale: float = 1.0) -> dict[str, float]:
        return self._all("update", samples, teacher, lr_scale)

    def student_topk_ids(self, samples: list[Sample], k: int) -> list[torch.Tensor]:
        return self._get(self.ranks[0].call.remote("student_topk_ids", samples, k), "student_topk_ids")

    def probe_fidelity(self, samples: list[Sample], teacher: list[TeacherTopK], teacher_full: list[TeacherTopK],
                       seed: int) -> dict[str, float]:
        """Rank 0 alone (ddp: it holds the whole model; the probe touches no parameter's gradient)."""
        return self._get(self.ranks[0].call.remote("probe_fidelity", samples, teacher, teacher_full, seed),
                         "probe_fidelity")

    def weights(self) -> dict[str, torch.Tensor]:
        return self._all("weights")

    def state(self) -> dict[str, Any]:
        return self._all("state")

    def load_state(self, state: dict[str, Any], folder: str | Path | None = None) -> None:
        self._all("load_state", state, None if folder is None else str(folder))

    def save_pretrained(self, path: str | Path) -> None:
        self._get([r.save_pretrained.remote(str(path)) for r in self.ranks], "save_pretrained")

    def shutdown(self) -> None:
        """Kill the ranks and release their placement groups (idempotent)."""
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
        for pg in self.placements:
            remove_placement_group(pg)
        self.placements = []
