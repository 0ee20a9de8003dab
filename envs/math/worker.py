"""The grading worker: a child process that compares one answer with one reference using math-verify.

Run as a script (``python worker.py``) by ``grading.py``, never imported by the framework; it needs only the
standard library and math-verify, so it starts without importing ``envs``, gymnasium or torch. Protocol: one JSON
object per line on stdin ``{"pred": str, "ref": str, "limit": int}``, one per line on stdout
``{"correct": bool}``; a ``{"ready": true}`` line once math-verify is imported. EOF on stdin ends the process.

Why a separate process: math-verify's own timeout is ``signal.alarm`` in the calling thread, which fails outside
the main thread (Ray actors, thread pools), and sympy can hang or exhaust memory on inputs like ``9^{9^{9^{9}}}``.
Here its timeouts are disabled (``parsing_timeout=None``, ``timeout_seconds=None``); the parent kills this process
when a comparison overruns, and ``signal.alarm`` with the *default* SIGALRM action is a backstop that ends the
process from the kernel even while a C-level big-integer operation holds the interpreter (e.g. the parent is gone).

Safety: only ``LatexExtractionConfig`` is used. It parses with latex2sympy's ANTLR grammar into sympy objects;
the only strings it passes to sympy's string parser are lexer-validated number tokens. ``ExprExtractionConfig``
(which runs ``sympy.parse_expr`` -- an ``eval`` -- on regex-matched text) is deliberately not used.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys

# A runaway comparison fails with MemoryError (caught below) instead of swapping the host.
MEMORY_LIMIT_BYTES = 4 << 30


def _limit_memory() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT_BYTES, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    # The protocol gets a private copy of stdout; stray prints from sympy/math-verify go to stderr instead.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    _limit_memory()

    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify warns on every call that its own timeout is off; that is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig()]

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    send({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        signal.alarm(int(job["limit"]))
        try:
            gold = parse("\\boxed{" + job["ref"] + "}", config, parsing_timeout=None)
            pred = parse("\\boxed{" + job["pred"] + "}", config, parsing_timeout=None)
            correct = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        except Exception:  # noqa: BLE001 - any failure to parse or compare model text means "not equivalent"
            correct = False
        signal.alarm(0)
        send({"correct": bool(correct)})


if __name__ == "__main__":
    main()
