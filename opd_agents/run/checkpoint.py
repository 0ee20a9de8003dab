"""Atomic, verified, resumable checkpoints: `checkpoints/step_<N>/` = student (save_pretrained) + trainer_state.pt.

Writing: a checkpoint is assembled in a hidden temp folder, fsynced, then marked complete by a `COMPLETE` file
written last — a JSON manifest with the step and the SHA-256 of every other file — and renamed into place (a rename is
atomic), so a kill at any instant leaves either no `step_<N>` or a complete one. Nothing complete is ever deleted
before its replacement is in place: re-saving a step renames the old folder aside first (restored by the next reader if
the kill came between the two renames), and pruning removes a folder's marker before its files, so a half-deleted
folder never looks complete.

Reading trusts nothing: `load_latest` walks the complete checkpoints newest first, checks every file against the
manifest and loads trainer_state.pt with `torch.load(weights_only=True)` (no pickle: no code runs from the file); a
truncated, corrupt or tampered-looking checkpoint is reported and the previous one is used. trainer_state.pt holds
optimizer, LR scheduler and RNG states (as tensors and plain Python values), step and weight version. The manifest
(`Manifest`) and, for the trainer, the loaded state (`TrainerState`) are shape-checked too: a file that passes its
SHA-256 check but stores `step: "abc"` is a damaged checkpoint like any other.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from envs.user_files import MIB, UserFileError, load_json, validate
from opd_agents.quiet_loading import no_progress_bars

_MARKER = "COMPLETE"
_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ASIDE = re.compile(r"^\.step_(\d+)\.replaced$")
MANIFEST_MAX_BYTES = 16 * MIB


class CheckpointError(RuntimeError):
    """A checkpoint on disk failed verification or could not be read."""


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != _MARKER)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, save_model: Callable[[Path], None], state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write `ckpt_dir/step_<step>` atomically and prune to the newest `keep_last` complete checkpoints.

    `save_model(folder)` writes the student there (save_pretrained weights + tokenizer)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with no_progress_bars():
        save_model(tmp)
    torch.save(state, tmp / _STATE)
    manifest = {"step": step, "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}}
    (tmp / _MARKER).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_tree(tmp)
    aside = ckpt_dir / f".step_{step}.replaced"
    if final.exists():  # a re-save of the same step (e.g. after resume): keep the old one until the new one is in
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_tree(ckpt_dir)
    _remove(aside)
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        _remove(old)
    return final


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its marker first: a kill midway leaves a folder that is not complete."""
    (folder / _MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints carrying a marker, oldest first. Half-written temp folders are deleted; a folder renamed aside by
    an interrupted re-save is restored when its replacement never landed."""
    if not ckpt_dir.is_dir():
        return []
    for path in list(ckpt_dir.iterdir()):
        aside = _ASIDE.match(path.name)
        if aside:
            final = ckpt_dir / f"step_{aside.group(1)}"
            if (final / _MARKER).is_file():
                _remove(path)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(path, final)
    found = []
    for path in ckpt_dir.iterdir():
        if path.name.startswith(".step_") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
            continue
        m = _STEP_DIR.match(path.name)
        if m and (path / _MARKER).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint with a marker (not verified: `load_latest` verifies)."""
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


class Manifest(BaseModel):
    """The `COMPLETE` marker: the step and the SHA-256 of every other file of the checkpoint."""

    step: int = Field(ge=0, strict=True)
    sha256: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]


class _LearnerState(BaseModel):
    model_config = ConfigDict(extra="allow")
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    bad_steps: int = Field(ge=0, strict=True)
    skipped_steps: int = Field(ge=0, strict=True)


class _NumpyRng(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    kind: str
    keys: torch.Tensor
    pos: int = Field(strict=True)
    has_gauss: int = Field(strict=True)
    cached_gaussian: float


class _RngState(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    python: tuple[int, tuple[int, ...], float | None]
    numpy: _NumpyRng
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None = None


class TrainerState(BaseModel):
    """What `trainer_state.pt` must hold for `Trainer` to resume from it (checked after loading, before use)."""

    model_config = ConfigDict(extra="allow")
    step: int = Field(ge=0, strict=True)
    learner: _LearnerState
    rng: _RngState
    failed_probes: int = Field(0, ge=0, strict=True)


def read_manifest(folder: Path) -> Manifest:
    """The checkpoint's manifest, read through `envs.user_files` and shape-checked (CheckpointError otherwise)."""
    path = folder / _MARKER
    try:
        manifest = validate(Manifest, load_json(path, MANIFEST_MAX_BYTES, "checkpoint manifest"), path,
                            "checkpoint manifest")
    except UserFileError as exc:
        raise CheckpointError(f"{folder}: its {_MARKER} manifest is unreadable or from an older version ({exc})") \
            from None
    if _STATE not in manifest.sha256:
        raise CheckpointError(f"{folder}: its {_MARKER} manifest lists no {_STATE}")
    return manifest


def verify(folder: Path) -> Manifest:
    """Raise CheckpointError unless every file the manifest lists exists with its recorded SHA-256; the manifest."""
    manifest = read_manifest(folder)
    sums = manifest.sha256
    for rel, digest in sums.items():
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise CheckpointError(f"{folder}: manifest names a file outside the checkpoint: {rel!r}")
        if not path.is_file():
            raise CheckpointError(f"{folder}: {rel} is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{folder}: {rel} does not match its checksum (truncated or modified)")
    return manifest


def load_trainer_state(folder: Path, schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """Verify `folder` and load its trainer state without unpickling (weights_only=True): a dict whose `step` is
    the manifest's, of the shape `schema` (e.g. `TrainerState`) when one is given."""
    manifest = verify(folder)
    try:
        state = torch.load(folder / _STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to decode is a bad checkpoint, reported with its path
        raise CheckpointError(f"{folder}: {_STATE} cannot be loaded safely: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder}: {_STATE} holds a {type(state).__name__}, not the trainer's state dict")
    try:
        if schema is not None:
            validate(schema, state, folder / _STATE, "trainer state")
    except UserFileError as exc:
        raise CheckpointError(str(exc)) from None
    if "step" in state and state["step"] != manifest.step:
        raise CheckpointError(f"{folder}: {_STATE} says step {str(state['step'])[:40]!r}, its manifest step "
                              f"{manifest.step}")
    return state


def load_latest(ckpt_dir: Path, schema: type[BaseModel] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies (its state of the shape `schema`, when given) and its trainer state; broken
    newer ones are reported and skipped. None when there is none; CheckpointError when checkpoints exist but none
    verifies."""
    done = complete_checkpoints(ckpt_dir)
    problems = []
    for folder in reversed(done):
        try:
            return folder, load_trainer_state(folder, schema)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping checkpoint {folder.name}: {exc}", stacklevel=2)
    if problems:
        raise CheckpointError("no checkpoint in " + str(ckpt_dir) + " passes verification: " + "; ".join(problems))
    return None
