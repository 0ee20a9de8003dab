"""Where a stored result came from: the code's commit, a hash of the run's config, and paths free of the machine.

Stored artefacts (`experiments/results/`) record these so a reader can tell which code and which settings produced
a number, and so they carry no home folder or cache location of the machine that wrote them.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from opd_agents.config import Config, config_dict

ROOT = Path(__file__).resolve().parents[2]  # the repository (or the installed tree) holding opd_agents/
# Keys that name where a run lives, not what it does: left out of the config hash, so the same settings under
# another run name or output folder hash alike (the seeds stay in: another seed is another run).
_PLACE_KEYS = ("name", "output_dir")
GIT_TIMEOUT_S = 10.0


def code_version(root: Path = ROOT) -> dict[str, Any]:
    """`{"commit": sha, "dirty": bool}` of the git checkout at `root` (dirty: tracked files differ from the commit);
    `{"commit": None, "dirty": None}` when it is not a git checkout or git is missing or hangs."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def config_sha256(cfg: Config) -> str:
    """sha256 of the resolved config as config.yaml holds it (credentials redacted), without `run.name` and
    `run.output_dir`: equal hashes mean the same settings, seeds included."""
    data = config_dict(cfg)
    data["run"] = {k: v for k, v in data["run"].items() if k not in _PLACE_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def portable_path(path: str | Path) -> str:
    """`path` as a stored artefact may show it: relative to the repository when inside it, `$OPD_AGENTS_CACHE/...`
    inside the cache, `~/...` inside the home folder, else its last two parts after `.../`."""
    resolved = Path(path).expanduser().resolve()
    cache = Path(os.environ.get("OPD_AGENTS_CACHE", Path.home() / ".cache" / "opd_agents")).expanduser().resolve()
    for base, label in ((ROOT, None), (cache, "$OPD_AGENTS_CACHE"), (Path.home().resolve(), "~")):
        if resolved.is_relative_to(base):
            rel = resolved.relative_to(base)
            return str(rel) if label is None else f"{label}/{rel}"
    return ".../" + "/".join(resolved.parts[-2:])
