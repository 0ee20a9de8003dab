"""Where the zoo lives on disk: the cache layout, the zoo's model names, and the build-once protocol.

Owns the cache layout (``$OPD_AGENTS_CACHE/zoo/<build-version>/<name>``, default cache ``~/.cache/opd_agents``),
the completion marker, and the build-once protocol: a build runs under an exclusive file lock (``fcntl``), so
concurrent first uses (several processes, Ray actors) build once while the others wait; it writes into a
temporary sibling folder and renames it into place only after writing the marker, so an interrupted build never
leaves a folder that looks complete, and it never deletes a folder that is not a zoo (``check_target``). Importing
this module is cheap (no torch / transformers); it knows nothing of the build itself (`zoo:<name>` resolution, which
may build, is `resolve.py`).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from opd_agents.config import ZOO_PREFIX

PREFIX = ZOO_PREFIX
ZOO_NAMES = ("student", "math-teacher", "math-teacher-eot", "alfworld-teacher", "tokenizer")
MARKER = "ZOO_COMPLETE"
MANIFEST = "zoo_manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("OPD_AGENTS_CACHE", Path.home() / ".cache" / "opd_agents")).expanduser() / "zoo"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def lock_timeout_s() -> float:
    """Seconds to wait for another process's build (``$OPD_AGENTS_ZOO_LOCK_TIMEOUT_S``; default 2 h, four times a
    2-core build)."""
    raw = os.environ.get("OPD_AGENTS_ZOO_LOCK_TIMEOUT_S", "7200")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"OPD_AGENTS_ZOO_LOCK_TIMEOUT_S={raw!r} must be a positive number of seconds")
    return value


@contextmanager
def exclusive_lock(lock_file: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file``, waiting at most ``timeout_s`` (default ``lock_timeout_s()``)
    for its holder; released on exit, or by the OS if we die. TimeoutError names the holder."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (lock_timeout_s() if timeout_s is None else timeout_s)
    waiting = False
    with open(lock_file, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    print(f"waiting for {lock_file} (held by {holder}: a zoo build in progress?), at most "
                          f"{deadline - time.monotonic():.0f} s", file=sys.stderr, flush=True)
                    waiting = True
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise TimeoutError(f"{lock_file} is still held by {holder} (a zoo build in progress?) after "
                                       "waiting; stop that process, or raise $OPD_AGENTS_ZOO_LOCK_TIMEOUT_S") from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_target(folder: Path) -> None:
    """ValueError unless ``folder`` may receive a zoo build: absent, empty, a zoo (it has the marker), or what an
    interrupted removal of one leaves (zoo entries only). Anything else is refused before a build starts and never
    deleted: a folder of the user's given as ``--out`` is left as it is."""
    folder = Path(folder)
    if not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir():
        raise ValueError(f"zoo folder {str(folder)!r} exists and is not a folder; choose another --out")
    if not is_complete(folder):
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in (*ZOO_NAMES, MANIFEST))
        if foreign:
            raise ValueError(f"zoo folder {str(folder)!r} holds {foreign[:3]}{' ...' if len(foreign) > 3 else ''} and "
                             f"no zoo build ({MARKER} is missing); it is left as it is: choose an empty or new folder "
                             "for --out")


def build_once(folder: Path, build: Callable[[Path], None], force: bool = False) -> Path:
    """``folder``, built by ``build(tmp)`` unless already complete; safe under concurrency and interruption.

    ``build`` fills a fresh temporary folder; the marker is written after it returns and the folder renamed
    into place. Leftover temporary folders of interrupted builds are removed by the next build. A target that is not
    a zoo (``check_target``) is refused before building, and checked again before the rename.
    """
    folder = Path(folder)
    if is_complete(folder) and not force:
        return folder
    check_target(folder)
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if is_complete(folder) and not force:  # built by whoever held the lock before us
            return folder
        for stale in [*folder.parent.glob(f".{folder.name}.building-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        aside = folder.parent / f".{folder.name}.old-{os.getpid()}"
        try:
            build(tmp)
            (tmp / MARKER).write_text("complete\n")
            check_target(folder)
            if folder.exists():  # an empty folder, a leftover or a forced rebuild: moved aside in one rename
                folder.rename(aside)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(aside, ignore_errors=True)
    return folder
