"""What a model folder's files claim, checked before anything loads them: the files are regular (`check_folder_files`),
`config.json`'s shape and size, and the tokenizer against the embedding it indexes.

`model_config(key, folder)` reads `config.json` through the user-file layer (`envs.user_files`: a regular file, at
most `CONFIG_MAX_BYTES`, a JSON object). `check_model_size` estimates the parameter count from the architecture
fields (vocabulary, hidden size, layers, MLP width, experts) and refuses a model whose weights could not fit this
machine's memory (RAM plus GPU memory; only for a local Ray cluster, whose machine this is) or that claims more than
`MAX_PARAMETERS`, before a byte of weights is allocated: `from_pretrained` would otherwise try. `check_tokenizer_fits`
refuses a tokenizer with more tokens than the model's `vocab_size` (its top ids would index past the embedding).
Ground floor (the run's preflight and the zoo's `diagnose` both use it): imports only the config package and the
user-file layer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from envs.user_files import MIB, UserFileError, check_regular, load_json
from opd_agents.config import ConfigError

CONFIG_MAX_BYTES = 4 * MIB
TEXT_FILE_MAX_BYTES = 256 * MIB  # tokenizer.json of a 256k vocabulary is ~30 MiB
MAX_PARAMETERS = 2 * 10**12  # above the largest open models (~1T); a bigger claim is a broken or hostile config
_DIM_MAX = 1 << 31
_BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2}
_FIELDS = {  # the size field -> its names across architectures
    "vocab_size": ("vocab_size", "n_vocab"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "intermediate_size": ("moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}


def check_folder_files(key: str, folder: str | Path) -> None:
    """ConfigError when an entry of the model folder is neither a folder nor a regular file (a FIFO would block the
    tokenizer or weight loader forever, a device would feed it without end), or a tokenizer or config file is larger
    than `TEXT_FILE_MAX_BYTES` (they are read whole)."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_dir():
            continue
        try:
            check_regular(path, f"{key}: model file")
        except UserFileError as exc:
            raise ConfigError(str(exc)) from None
        if path.suffix in (".json", ".txt", ".jinja", ".model") and path.stat().st_size > TEXT_FILE_MAX_BYTES:
            raise ConfigError(f"{key}: {path} is {path.stat().st_size / MIB:,.0f} MiB, more than a tokenizer or config "
                              f"file has ({TEXT_FILE_MAX_BYTES / MIB:,.0f} MiB); is it the right folder?")


def model_config(key: str, folder: str | Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict; unreadable, too large or not a JSON object is a ConfigError."""
    path = Path(folder) / "config.json"
    try:
        config = load_json(path, CONFIG_MAX_BYTES, "model config")
    except UserFileError as exc:
        raise ConfigError(f"{key}: {exc} (not a readable JSON model config); re-save the model with "
                          "save_pretrained") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _dim(key: str, config: dict[str, Any], field: str) -> int | None:
    """The architecture field `field` (any of its names, top level or `text_config`), checked to be a sane int."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for name in _FIELDS[field]:
        value = config.get(name, text.get(name))
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < _DIM_MAX:
            raise ConfigError(f"{key}: config.json's {name} = {str(value)[:40]} is not a positive integer below "
                              f"2^31; is it the right config.json?")
        return value
    return None


def estimated_parameters(key: str, config: dict[str, Any]) -> int | None:
    """An upper estimate of the parameter count (None when the architecture fields are not there): embeddings
    (twice unless tied) + per layer attention 4h^2 and a gated MLP 3hI per expert."""
    vocab, hidden, layers = (_dim(key, config, f) for f in ("vocab_size", "hidden_size", "num_hidden_layers"))
    if vocab is None or hidden is None or layers is None:
        return None
    inner = _dim(key, config, "intermediate_size") or 4 * hidden
    experts = _dim(key, config, "experts") or 1
    tied = config.get("tie_word_embeddings", True) is not False
    return vocab * hidden * (1 if tied else 2) + layers * (4 * hidden * hidden + 3 * hidden * inner * experts)


def machine_memory_bytes() -> int:
    """RAM plus the memory of every visible GPU."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    gpus = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else 0
    return ram + gpus


def check_model_size(key: str, config: dict[str, Any], dtype: str, local: bool) -> None:
    """ConfigError when config.json describes a model over MAX_PARAMETERS or, on a local cluster (`local`), one whose
    weights in `dtype` (at least 2 bytes a parameter) exceed this machine's memory."""
    params = estimated_parameters(key, config)
    if params is None:
        return
    if params > MAX_PARAMETERS:
        raise ConfigError(f"{key}: config.json describes a model of about {params:.3g} parameters, more than any "
                          f"model this project loads ({MAX_PARAMETERS:.0e}); is it the right config.json?")
    size = params * _BYTES_PER_PARAMETER.get(dtype, 2)
    memory = machine_memory_bytes()
    if local and size > memory:
        raise ConfigError(f"{key}: config.json describes a model of about {params / 1e9:,.1f} B parameters "
                          f"({size / 2**30:,.0f} GiB of weights), more than this machine's "
                          f"{memory / 2**30:,.0f} GiB of RAM and GPU memory; use a smaller model, or a cluster "
                          "(ray.address) that can hold it")


def check_tokenizer_fits(key: str, tokenizer: Any, config: dict[str, Any]) -> None:
    """ConfigError when the tokenizer has more tokens than the model's embedding rows (`vocab_size`)."""
    vocab = _dim(key, config, "vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"{key}: the tokenizer has {len(tokenizer):,} tokens but config.json's vocab_size is "
                          f"{vocab:,}: ids from {vocab:,} up would index past the embedding; save the tokenizer that "
                          "belongs to this model")
