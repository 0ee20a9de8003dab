"""`run.imports`: the user's modules, imported first in a child process under a time bound, then in this one.

A user module runs arbitrary code when imported. Imported straight into the driver, one that sleeps forever hangs
start-up, one that calls `os._exit(0)` ends the run with exit code 0 having done nothing and said nothing, and one that
raises `SystemExit` escapes every `except Exception`. So `import_user_modules` imports them, in order, in a child
Python (same interpreter, working directory and `sys.path`) bounded by `IMPORT_TIMEOUT_S`; the child reports each
module on a pipe of its own, so whatever a module prints cannot be mistaken for a report. A hang, an exit, a crash or
an exception is one ConfigError naming the module; only then are the modules imported here (an exit or exception
here is caught the same way). A module's import side effects therefore run twice in the driver's start-up (once in
the child, once here), and once more in every Ray worker that imports `run.imports`: keep them to registration.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from opd_agents.config import ConfigError

IMPORT_TIMEOUT_S = 120.0

_CHILD = """
import importlib, json, os, sys
os.set_inheritable(int(sys.argv[1]), False)
out = os.fdopen(int(sys.argv[1]), "w")
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        kind = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else type(exc).__name__
        out.write(json.dumps({"module": name, "error": f"{kind}: {exc}"[:500]}) + "\\n")
        out.flush()
        os._exit(0)
    out.write(json.dumps({"module": name}) + "\\n")
    out.flush()
out.write(json.dumps({"done": True}) + "\\n")
out.flush()
os._exit(0)
"""


def _reports(read_fd: int) -> list[dict]:
    """The child's report lines, read without waiting (the child has ended; a process it left behind may still hold
    the pipe open)."""
    os.set_blocking(read_fd, False)
    data = b""
    try:
        while len(data) < 1 << 20 and (chunk := os.read(read_fd, 1 << 16)):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(read_fd)
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def probe_imports(modules: Sequence[str], timeout_s: float | None = None) -> None:
    """Import `modules` in a child process within `timeout_s` (default `IMPORT_TIMEOUT_S`); ConfigError naming the
    first module that fails, exits or hangs."""
    if not modules:
        return
    timeout_s = IMPORT_TIMEOUT_S if timeout_s is None else timeout_s
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryFile() as stderr:
        try:
            child = subprocess.Popen([sys.executable, "-c", _CHILD, str(write_fd), *modules], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=(write_fd,), env=env,
                                     start_new_session=True)
        finally:
            os.close(write_fd)
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = None
        stderr.seek(0)
        tail = stderr.read()[-400:].decode("utf-8", "replace").strip()
    reports = _reports(read_fd)
    if any(r.get("done") for r in reports):
        return
    imported = [r["module"] for r in reports if "module" in r and "error" not in r]
    failed = next((r for r in reports if "error" in r), None)
    culprit = failed["module"] if failed else next((m for m in modules if m not in imported), modules[0])
    if failed is not None:
        raise ConfigError(f"run.imports: cannot import {culprit!r}: {failed['error']}")
    if code is None:
        why = f"it was still importing after {timeout_s:g} s (a loop or a wait at import time?)"
    else:
        why = (f"the process ended with exit code {code} while importing it (os._exit, or a crash)"
               + (f"; its last output: {tail}" if tail else ""))
    raise ConfigError(f"run.imports: cannot import {culprit!r}: {why}. A module listed in run.imports should only "
                      "register things (envs, teachers, losses) when imported")


def import_user_modules(modules: Sequence[str], timeout_s: float | None = None) -> None:
    """`probe_imports`, then the same imports in this process (see the module docstring)."""
    probe_imports(modules, timeout_s)
    for name in modules:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # a user module may fail with anything at import time
            raise ConfigError(f"run.imports: cannot import {name!r}: {type(exc).__name__}: {exc}") from exc
