"""Running the zoo build's independent jobs (demonstration slices, model trainings) in parallel processes.

Owns :func:`run_jobs`: each job is a picklable ``(function, args)``; with one worker they run here in order, else
in a ``spawn`` process pool (the parent may hold threads — torch, Ray — that make ``fork`` unsafe; an executor, not
``multiprocessing.Pool``, so a worker that dies fails the call instead of being replaced forever). Results come
back in job order, so what a build produces does not depend on the number of workers.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

Job = tuple[Callable[..., Any], tuple[Any, ...]]


def run_jobs(jobs: Sequence[Job], workers: int, what: str) -> list[Any]:
    """``[function(*args) for function, args in jobs]``, on up to ``workers`` processes; ``what`` names the jobs
    in the error raised when a worker process dies."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [function(*args) for function, args in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(function, *args) for function, args in jobs]
        try:
            return [future.result() for future in futures]
        except BrokenProcessPool as error:
            raise RuntimeError(
                f"zoo build ({what}): a worker process died. Workers start with 'spawn', which re-imports the main "
                "script: put a script's top-level code under `if __name__ == \"__main__\":`, or build with "
                "workers=1 (`python -m opd_agents.zoo build --workers 1`)."
            ) from error
