"""`resolve_model_path` and the build-once protocol: cache layout, lock, completion marker, interrupted builds."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from opd_agents.zoo.paths import MARKER, ZOO_NAMES, build_once, is_complete
from opd_agents.zoo.resolve import resolve_model_path, zoo_dir


def test_non_zoo_paths_pass_through_unchanged():
    for path in ("Qwen/Qwen3-1.7B", "/models/teacher", "./student", "zoo", "zoos:student"):
        assert resolve_model_path(path) == path


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(ValueError) as error:
        resolve_model_path("zoo:big-teacher")
    for name in ZOO_NAMES:
        assert f"zoo:{name}" in str(error.value)


def test_zoo_names_resolve_into_the_versioned_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(tmp_path))
    folder = zoo_dir()
    assert folder.parent == tmp_path / "zoo" and len(folder.name) == 12
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("complete\n")  # a finished build: nothing is rebuilt
    for name in ZOO_NAMES:
        assert resolve_model_path(f"zoo:{name}") == str(folder / name)
    other = zoo_dir(build_seed=1)  # another build seed: another folder, built on its own first use
    assert other.parent == folder.parent and other != folder
    other.mkdir()
    (other / MARKER).write_text("complete\n")
    assert resolve_model_path("zoo:student", build_seed=1) == str(other / "student")


def _writer(log: list[str], delay: float = 0.0):
    def build(tmp: Path) -> None:
        log.append("start")
        time.sleep(delay)
        (tmp / "model.txt").write_text("weights")
    return build


def test_interrupted_build_is_not_picked_up(tmp_path):
    folder = tmp_path / "zoo" / "v1"
    folder.parent.mkdir(parents=True)

    def crash(tmp: Path) -> None:
        (tmp / "model.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(folder, crash)
    assert not folder.exists() and list(folder.parent.iterdir()) == [folder.parent / ".v1.lock"]
    # A folder with something else in it (no marker) is never built over nor deleted.
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\] and no zoo build"):
        build_once(folder, _writer([]), force=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (folder / "notes.txt").unlink()
    # A half folder left by a killed removal (zoo entries, no marker) and a stale temp folder are rebuilt / removed.
    (folder / "student").mkdir()
    (folder / "student" / "model.txt").write_text("half")
    stale = folder.parent / ".v1.building-old"
    stale.mkdir()
    log: list[str] = []
    assert build_once(folder, _writer(log)) == folder
    assert log == ["start"] and is_complete(folder) and (folder / "model.txt").read_text() == "weights"
    assert not stale.exists() and not (folder / "student").exists()
    assert build_once(folder, _writer(log)) == folder and log == ["start"]  # complete: not rebuilt
    build_once(folder, _writer(log), force=True)
    assert log == ["start", "start"] and is_complete(folder)


def test_concurrent_first_uses_build_once(tmp_path):
    folder = tmp_path / "zoo" / "v1"
    folder.parent.mkdir(parents=True)
    log: list[str] = []
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(folder, _writer(log, 0.3))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log == ["start"] and results == [folder] * 4 and is_complete(folder)


def test_waiting_for_a_held_build_lock_ends_with_a_clear_error(tmp_path, capsys) -> None:
    import subprocess
    import sys

    import pytest

    from opd_agents.zoo.paths import exclusive_lock

    lock = tmp_path / ".zoo.lock"
    lock.write_text("pid 4242\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1], 'a'); "
                               "fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="still held by pid 4242"):
            with exclusive_lock(lock, timeout_s=1.0):
                pass
        assert "waiting for" in capsys.readouterr().err  # said once, at the start of the wait
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with exclusive_lock(lock, timeout_s=1.0):
        assert lock.read_text() == f"pid {__import__('os').getpid()}\n"
