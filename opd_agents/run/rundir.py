"""The run directory `<output_dir>/<name>/` and atomic file writes.

Layout: config.yaml (resolved, credentials redacted), metrics.jsonl, tb/ (TensorBoard), checkpoints/step_<N>/,
eval/*.json, plots/*.png, .lock. Everything is written so that a kill at any instant leaves either the old or the new
file, never a torn one: whole files go through a temp file + fsync + `os.replace`.

One process at a time: `create` takes an exclusive lock on `<run>/.lock` (released by the OS when the process ends,
however it ends), so a second `--resume` of a live run fails at once instead of interleaving checkpoints. A resume must
keep the run's config: only the keys in `RESUME_MAY_CHANGE` (length, cadence, logging, cluster, timeouts, eval) may
differ from the saved config.yaml; the previous file is kept as config.before-resume-<n>.yaml.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from envs.user_files import UserFileError, check_regular, read_text
from opd_agents import safe_yaml
from opd_agents.config import Config, ConfigError, config_dict, dump_config

# Config keys (prefixes) a `--resume` may change: none of them alters what the run has trained so far.
RESUME_MAY_CHANGE = ("run.steps", "run.eval_every", "run.eval_before", "run.save_every", "run.keep_last", "logging.",
                     "ray.", "eval.", "rollout.start_timeout_s", "rollout.call_timeout_s", "rollout.max_restarts",
                     "learner.timeout_s", "run.pipeline_timeout_s")
# What a run directory holds: name -> whether it is a folder (else a regular file). Anything else in its place (a FIFO,
# a device, a folder named config.yaml) is refused before the run starts.
_ENTRIES = {"config.yaml": False, "metrics.jsonl": False, ".lock": False, "eval.json": False, "report.html": False,
            "checkpoints": True, "eval": True, "tb": True, "plots": True}


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old content or the new, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunDir:
    """Paths of one run; `create` makes the folder and saves the resolved config."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: IO[str] | None = None

    @classmethod
    def for_config(cls, cfg: Config) -> RunDir:
        return cls(Path(cfg.run.output_dir) / cfg.run.name)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def check(self, *, resume: bool) -> bool:
        """ConfigError unless the run folder can be created (or resumed); whether it holds a run already. Cheap, so
        the entry points call it before the expensive checks (a zoo build) as well as in `create`."""
        for folder in (self.root.parent, self.root):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{str(folder)!r} is a file, not a folder; choose another run.output_dir / run.name")
        for name, folder in _ENTRIES.items():
            path = self.root / name
            if path.exists() or path.is_symlink():
                if folder and not path.is_dir():
                    raise ConfigError(f"{str(path)!r} is not a folder; a run directory's {name} must be one (move "
                                      "it away, or choose another run.name)")
                if not folder:
                    try:
                        check_regular(path, f"the run directory's {name}")
                    except UserFileError as exc:
                        raise ConfigError(f"{exc} (move it away, or choose another run.name)") from None
        has_content = self.root.is_dir() and any(p.name != ".lock" for p in self.root.iterdir())
        if has_content and not resume:
            raise ConfigError(
                f"run directory {str(self.root)!r} already exists; pass --resume to continue it, or choose "
                f"another name (run.name=...) — nothing in it was changed")
        return has_content

    def create(self, cfg: Config, *, resume: bool) -> None:
        """Make the run folder, lock it and save the config. A non-empty existing run needs `resume`, a config the
        resume may take, and no other process holding it (nothing in it is touched otherwise)."""
        has_content = self.check(resume=resume)
        previous = self._changed_keys(cfg) if has_content and self.config_path.is_file() else []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {str(self.root)!r}: {exc.strerror}") from None
        self._acquire_lock()
        try:
            if previous:
                n = len(list(self.root.glob("config.before-resume-*.yaml"))) + 1
                os.replace(self.config_path, self.root / f"config.before-resume-{n}.yaml")
            atomic_write_text(self.config_path, dump_config(cfg))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the run directory's lock (also released when the process ends, however it ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _acquire_lock(self) -> None:
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"run directory {str(self.root)!r} is in use by {holder}; wait for it to end or stop "
                              "it before resuming") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def _changed_keys(self, cfg: Config) -> list[str]:
        """Dotted keys whose value differs from the saved config.yaml; an error if any of them may not change."""
        try:
            saved = safe_yaml.load(read_text(self.config_path, safe_yaml.MAX_BYTES, "saved config"))
        except (UserFileError, safe_yaml.YAMLInputError) as exc:
            raise ConfigError(f"{self.config_path} is unreadable ({exc}); restore it or start a new run") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{self.config_path} holds a {type(saved).__name__}, not a saved config (a mapping of "
                              "sections); restore it or start a new run")
        new = config_dict(cfg)
        changed = sorted(k for k in _diff(saved, new) if not _added_since(saved, new, k))
        fixed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
        if fixed:
            raise ConfigError(f"--resume with a config that differs from the run's saved config.yaml in {fixed}; "
                              f"a resume may change only {list(RESUME_MAY_CHANGE)}. Use the run's config (or start a "
                              "new run under another run.name)")
        return changed


def _added_since(saved: dict[str, Any], new: dict[str, Any], key: str) -> bool:
    """`section.name` is absent from the saved config (a field added to the schema after the run was started) and the
    resuming config leaves it at its default, which keeps the behaviour the run had: not a change."""
    section, _, name = key.partition(".")
    if not name or "." in name or not isinstance(saved.get(section), dict) or name in saved[section]:
        return False
    field = Config.model_fields.get(section)
    fields = getattr(field.annotation, "model_fields", {}) if field is not None else {}
    return (name in fields and not fields[name].is_required()
            and fields[name].get_default(call_default_factory=True) == new[section][name])


def _diff(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted keys where two plain-data trees differ (list items by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k for key in old.keys() | new.keys()
                for k in _diff(old.get(key), new.get(key), f"{prefix}{key}.")}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return {k for i, (a, b) in enumerate(zip(old, new)) for k in _diff(a, b, f"{prefix}{i}.")}
    return set() if old == new else {prefix.rstrip(".")}
