"""Answer grading with a hard timeout: ``grade(response, answer)`` and the worker pool behind it.

Owns the public grading function and the lifecycle of the grading worker processes (``worker.py``). The
equivalence test itself is math-verify's (fractions, decimals, percentages, LaTeX, intervals, sets, tuples,
units text); see ``worker.py`` for why it runs in a child process and why no model text reaches ``eval``.

Cost and guarantees:
- Each call borrows an idle worker (started lazily, ~1-2 s the first time: python + sympy import) and returns it;
  concurrent callers (threads) get separate workers, at most ``MAX_IDLE_WORKERS`` are kept. Works from any thread
  and inside Ray actors: nothing here uses signals in the calling process.
- The ``timeout`` covers one comparison (worker start-up is bounded separately by ``STARTUP_TIMEOUT_S``). A
  worker that overruns is killed and the answer counts as wrong; the next call starts a fresh worker.
- Extracted answers longer than ``MAX_ANSWER_CHARS`` are rejected without parsing (no real answer is that long).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from envs.math.answers import extract_answer, last_boxed

MAX_ANSWER_CHARS = 1_000
MAX_IDLE_WORKERS = 4
STARTUP_TIMEOUT_S = 120.0
# Statuses of ``check_answer``; only "correct" earns reward.
STATUSES = ("correct", "incorrect", "no_answer", "too_long", "timeout")

_WORKER_SCRIPT = Path(__file__).with_name("worker.py")


class GraderUnavailable(RuntimeError):
    """The grading worker could not be started (math-verify missing or broken): a setup error, not a wrong answer."""


class _Worker:
    """One grading child process and its line-based JSON pipe."""

    def __init__(self) -> None:
        # A new session keeps terminal Ctrl-C away from the worker; it exits on its own when stdin closes.
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", start_new_session=True,
        )
        if self._read_line(STARTUP_TIMEOUT_S) is None:
            code = self.kill()
            raise GraderUnavailable(
                f"the math grading worker ({_WORKER_SCRIPT}) did not start (exit code {code}); its error is on stderr "
                "above. Install the grader with: pip install 'math-verify[antlr4_13_2]'"
            )

    def _read_line(self, timeout: float) -> dict | None:
        """The next message, or None on timeout or if the worker died."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            except InterruptedError:
                continue
            if ready:
                line = self.process.stdout.readline()
                return json.loads(line) if line else None

    def ask(self, pred: str, ref: str, timeout: float) -> bool | None:
        """Whether ``pred`` is equivalent to ``ref``; None if the worker overran ``timeout`` or died."""
        # The worker's own SIGALRM backstop fires a little after the parent would have killed it.
        job = {"pred": pred, "ref": ref, "limit": math.ceil(timeout) + 2}
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return None
        reply = self._read_line(timeout)
        return None if reply is None else bool(reply["correct"])

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> int | None:
        self.process.kill()
        code = self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass  # a broken pipe on close means the worker is already gone, which is the goal
        return code


class _WorkerPool:
    """Idle workers shared by all threads of this process."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def acquire(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                worker.kill()
        return _Worker()

    def release(self, worker: _Worker) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_WORKERS and worker.alive():
                self._idle.append(worker)
                return
        worker.kill()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

    def forget(self) -> None:
        """In a forked child: the pipes belong to the parent's workers, so drop them without touching them."""
        self._idle = []
        self._lock = threading.Lock()


_POOL = _WorkerPool()
atexit.register(_POOL.close)
os.register_at_fork(after_in_child=_POOL.forget)


def check_answer(extracted: str | None, reference: str, timeout: float = 5.0) -> str:
    """Compare an already extracted answer with the reference; returns one of ``STATUSES``.

    Raises ``GraderUnavailable`` only when no grading worker can be started at all.
    """
    if not timeout > 0:
        raise ValueError(f"grading timeout must be a positive number of seconds, got {timeout!r}")
    if extracted is None or not extracted.strip():
        return "no_answer"
    if len(extracted) > MAX_ANSWER_CHARS:
        return "too_long"
    reference = last_boxed(reference) or reference
    worker = _POOL.acquire()
    verdict = worker.ask(extracted.strip(), reference.strip(), timeout)
    if verdict is None:
        worker.kill()
        return "timeout"
    _POOL.release(worker)
    return "correct" if verdict else "incorrect"


def grade(response: str, answer: str, timeout: float = 5.0, answer_format: str = "boxed") -> bool:
    """True when the final answer of ``response`` (last ``\\boxed{}`` by default) is equivalent to ``answer``.

    ``answer`` is the reference, bare (``"\\frac{1}{2}"``) or inside a worked solution (its last ``\\boxed{}``).
    Never evaluates model text as Python; returns False (not an exception) for missing, malformed, absurdly long
    or too-slow-to-compare answers, within about ``timeout`` seconds once a worker is running.
    """
    return check_answer(extract_answer(response, answer_format), answer, timeout) == "correct"
