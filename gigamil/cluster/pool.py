"""A process pool that survives its workers dying: the local executor's engine.

    run_pool(fn, [(key, item), ...], processes=4, threads=1, on_result=record,
             on_died=lambda key, item: failed_result(key, item), on_progress=bar.advance)

``fn(item)`` runs in a spawned worker process (so ``fn`` and the items must pickle). A
worker that dies (a segfault inside a slide library, the OOM killer) fails only the item it
was running: after a death the items that were in flight are retried one at a time, so that
a second death is that item's own, and ``on_died`` says what its result is. Workers die with
the parent, log at its level, and size their thread pools to their share of the cores
(:func:`gigamil.cluster.resources.configure_threads`). Inside a worker,
:func:`report_progress` sends counts (patches, say) back to ``on_progress``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from gigamil.cluster.resources import configure_threads

__all__ = ["run_pool", "report_progress"]

T = TypeVar("T")
R = TypeVar("R")

_PROGRESS: Any = None  # in a worker: the queue that progress counts go to


def report_progress(n: int) -> None:
    """From inside a pool worker: add ``n`` to the parent's progress (no-op elsewhere)."""
    if _PROGRESS is not None:
        _PROGRESS.put(n)


def _worker_init(log_level: int, progress: Any, threads: int) -> None:
    """In each worker: die with the parent (Linux), log like it, report progress to it,
    and use only this worker's share of the cores (no oversubscription)."""
    global _PROGRESS
    _PROGRESS = progress
    if progress is not None:
        # a worker killed while writing must not leave the next ones blocked on the pipe
        progress.cancel_join_thread()
    configure_threads(threads)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: workers then outlive a killed parent
        pass
    if log_level < logging.WARNING:
        logging.basicConfig(level=log_level, format="%(message)s")
    logging.getLogger("gigamil").setLevel(log_level)


class _Pool(Generic[T, R]):
    """One run of :func:`run_pool`: the queue, the crash counts, the pool of the moment."""

    def __init__(self, fn: Callable[[T], R], items: Sequence[tuple[str, T]], processes: int,
                 threads: int, on_result: Callable[[R], None],
                 on_died: Callable[[str, T], R], on_progress: Callable[[int], None] | None,
                 on_submit: Callable[[T], T] | None = None) -> None:
        self.fn, self.processes, self.threads = fn, max(1, processes), max(1, threads)
        self.on_submit = on_submit
        self.on_result, self.on_died, self.on_progress = on_result, on_died, on_progress
        self.queue: deque[tuple[str, T]] = deque(items)
        self.crashes: dict[str, int] = {}
        self.progress: Any = None

    def drain(self) -> None:
        while self.progress is not None and self.on_progress is not None:
            try:
                self.on_progress(self.progress.get_nowait())
            except Exception:  # noqa: BLE001 - queue.Empty
                return

    def run(self) -> None:
        ctx = mp.get_context("spawn")
        level = logging.getLogger("gigamil").getEffectiveLevel()
        while self.queue:
            # a fresh progress queue per pool: a dead worker may have broken the last one
            self.progress = ctx.Queue() if self.on_progress is not None else None
            pool = cf.ProcessPoolExecutor(self.processes, mp_context=ctx,
                                          initializer=_worker_init,
                                          initargs=(level, self.progress, self.threads))
            inflight: dict[cf.Future[R], tuple[str, T]] = {}
            broken = False
            try:
                broken = self._until_broken(pool, inflight)
                if broken:
                    self._after_death(inflight)
            finally:
                pool.shutdown(wait=not broken, cancel_futures=True)
                self.drain()

    def _may_start(self, inflight: dict[cf.Future[R], tuple[str, T]]) -> bool:
        """A suspect (an item in flight when a worker died) runs alone."""
        if not self.queue or len(inflight) >= self.processes:
            return False
        if any(self.crashes.get(key) for key, _ in inflight.values()):
            return False
        return not (self.crashes.get(self.queue[0][0]) and inflight)

    def _until_broken(self, pool: cf.ProcessPoolExecutor,
                      inflight: dict[cf.Future[R], tuple[str, T]]) -> bool:
        """Keep the pool full until the queue is empty (False) or a worker died (True)."""
        while self.queue or inflight:
            while self._may_start(inflight):
                job = self.queue.popleft()
                try:
                    item = job[1] if self.on_submit is None else self.on_submit(job[1])
                    inflight[pool.submit(self.fn, item)] = job
                except cf.process.BrokenProcessPool:
                    self.queue.appendleft(job)
                    return True
            if not inflight:
                return False
            done, _ = cf.wait(inflight, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            self.drain()
            broken = False
            for fut in done:  # every finished item is recorded before a death is handled
                try:
                    res = fut.result()
                except cf.process.BrokenProcessPool:
                    broken = True
                    continue
                self.on_result(res)
                del inflight[fut]
            if broken:
                return True
        return False

    def _after_death(self, inflight: dict[cf.Future[R], tuple[str, T]]) -> None:
        alone = len(inflight) == 1  # then the death was this item's own
        for fut, job in inflight.items():
            if fut.done() and fut.exception() is None:
                self.on_result(fut.result())  # finished before the pool broke
                continue
            self.crashes[job[0]] = self.crashes.get(job[0], 0) + 1
            if alone:
                self.on_result(self.on_died(*job))
            else:
                self.queue.appendleft(job)  # a suspect: retried alone


def run_pool(fn: Callable[[T], R], items: Sequence[tuple[str, T]], processes: int, *,
             on_result: Callable[[R], None], on_died: Callable[[str, T], R],
             threads: int = 1, on_progress: Callable[[int], None] | None = None,
             on_submit: Callable[[T], T] | None = None) -> None:
    """Run ``fn`` over ``items`` (``(key, item)`` pairs) in ``processes`` worker processes of
    ``threads`` threads each; every item's result (or ``on_died(key, item)``) goes to
    ``on_result`` as it arrives. ``on_submit`` turns an item into what the worker gets,
    in this process, just before it is handed out (e.g. a slide's staged copy)."""
    _Pool(fn, items, processes, threads, on_result, on_died, on_progress, on_submit).run()
