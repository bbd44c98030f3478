"""Worker processes that never inherit native thread pools, and a pool runner that cannot hang.

A process forked after its parent used OpenCV's, OpenMP's or torch's thread pools inherits their locks and
condition variables without the threads behind them, and can then wait forever: a child that calls
``cv2.setNumThreads(1)`` after the parent blurred a large image waits in ``pthread_cond_destroy``. So every
worker process of the pipeline (the refine pool, DataLoader workers) starts from a *forkserver*: a clean
process, started once per run, that has imported the pipeline's modules but run no threaded native code;
each worker forks from it in milliseconds and inherits no pool.

``run_pool`` maps a function over items on such a pool and ends with one clear error line when a worker
dies (killed, out of memory) or when no item finishes for ``stall_s`` seconds: the items already done keep
their outputs, so rerunning the stage resumes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import cv2
import torch

from pipeline.errors import UserError

# Imported once by the forkserver, so that workers fork with them loaded instead of importing them each.
PRELOAD = ["numpy", "torch", "cv2", "pipeline.refine.runner"]

_lock = threading.Lock()


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every worker process: forkserver (spawn where the platform has no forkserver)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    with _lock:
        ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first pool)
        if threading.current_thread() is threading.main_thread():
            # Each worker starts with the SIGINT handler the server started with, and takes a Ctrl-C (sent to the
            # whole process group) while it imports, before init_worker can ignore it: a traceback per worker.
            # Started with SIGINT ignored, the server hands its workers "ignore" from their first instruction.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                signal.signal(signal.SIGINT, previous)
    return ctx


def init_worker() -> None:
    """Set up a pool worker: Ctrl-C is the main process's to handle (no traceback from an idle worker), and
    one native thread each, so that N workers use N cores and their results do not depend on N."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class WorkerFailed(UserError):
    """A worker process died or stalled; the message names the stage and says how to resume."""


def _map_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def run_pool(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, *, what: str, stall_s: float,
             chunk: int = 1) -> Iterator[Any]:
    """``fn(item)`` for every item on ``workers`` worker processes, yielded in order of completion (a chunk of
    ``chunk`` items at a time). ``what`` names the work in errors (e.g. ``refine graphcut``). A worker that
    dies, or no chunk finishing within ``stall_s`` seconds, raises ``WorkerFailed``; on any error or Ctrl-C
    the queued chunks are dropped and the workers stopped."""
    items = list(items)
    chunks = [items[i:i + chunk] for i in range(0, len(items), max(1, chunk))]
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=init_worker)
    pending: set[Future] = set()
    try:
        pending = {pool.submit(_map_chunk, fn, c) for c in chunks}
        while pending:
            done, pending = wait(pending, timeout=stall_s, return_when=FIRST_COMPLETED)
            if not done:
                raise WorkerFailed(f"{what}: no image finished in {stall_s:g} s, a worker process stalled; the "
                                   f"images already done are kept: rerun to resume (refine.stall_timeout sets "
                                   f"the limit)")
            for future in done:
                try:
                    results = future.result()
                except BrokenProcessPool:
                    raise WorkerFailed(f"{what}: a worker process died (killed, or out of memory); the images "
                                       f"already done are kept: rerun to resume, or lower refine.workers"
                                       ) from None
                yield from results
    finally:
        for future in pending:
            future.cancel()
        _stop(pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting for a stalled worker: terminate what is still running."""
    processes = list((pool._processes or {}).values())  # private, but the only handle on the workers there is
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.kill()  # SIGKILL: a stopped or deadlocked worker does not act on SIGTERM
    for p in processes:
        p.join(timeout=10)
