"""Running model work off the GUI thread, without Qt: jobs, executors and a queue.

A :class:`Job` is a function (or a generator function, for work that yields results
as it goes) plus the callbacks that receive its outcome. An *executor* runs jobs:
:class:`SyncExecutor` at once in the calling thread (tests, scripts); the dock widget
passes one that uses napari's thread workers, whose callbacks arrive on the GUI thread.
:class:`JobQueue` runs one job at a time and replaces a queued job by a newer one with
the same key (several quick clicks on one slice compute once).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol


@dataclass
class Job:
    """Work and what to do with its outcome. Callbacks run where the executor delivers
    them (the GUI thread for napari's workers); ``on_error`` gets the exception."""

    fn: Callable[[], Any]
    on_result: Optional[Callable[[Any], None]] = None
    on_yield: Optional[Callable[[Any], None]] = None
    on_error: Optional[Callable[[BaseException], None]] = None
    on_done: Optional[Callable[[], None]] = None
    cancelled: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)  # the submitter's notes (e.g. for undo)
    _quit: Optional[Callable[[], None]] = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask a generator job to stop at its next item (items already given are kept)."""
        self.cancelled = True
        if self._quit is not None:
            self._quit()


class Executor(Protocol):
    def run(self, job: Job) -> None:
        """Start ``job``; its callbacks are called as it progresses."""


class SyncExecutor:
    """Runs each job to its end in the calling thread (tests and scripts)."""

    def run(self, job: Job) -> None:
        try:
            out = job.fn()
            if inspect.isgenerator(out):
                for item in out:
                    if job.on_yield is not None:
                        job.on_yield(item)
                    if job.cancelled:
                        out.close()
                        break
            elif job.on_result is not None:
                job.on_result(out)
        except Exception as err:  # delivered like a worker's "errored" signal
            if job.on_error is None:
                raise
            job.on_error(err)
        finally:
            if job.on_done is not None:
                job.on_done()


class NapariExecutor:
    """Runs jobs in napari thread workers; callbacks arrive on the GUI thread."""

    def run(self, job: Job) -> None:
        from napari.qt.threading import create_worker

        connect: Dict[str, Callable] = {"finished": job.on_done or (lambda: None)}
        if job.on_error is not None:
            connect["errored"] = job.on_error
        if job.on_result is not None:
            connect["returned"] = job.on_result
        if job.on_yield is not None:
            connect["yielded"] = job.on_yield
        worker = create_worker(job.fn, _connect=connect, _start_thread=False)
        job._quit = worker.quit
        if job.cancelled:
            worker.quit()
        worker.start()


class JobQueue:
    """One job at a time; a queued job is replaced by a newer one with the same key."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.running_key: Optional[tuple] = None
        self._pending: "Dict[tuple, Job]" = {}
        self.after_each: Optional[Callable[[], None]] = None

    @property
    def busy(self) -> bool:
        return self.running_key is not None or bool(self._pending)

    @property
    def keys(self) -> list:
        """Keys of the running and queued jobs."""
        return [k for k in [self.running_key, *self._pending] if k is not None]

    def pending(self, key: tuple) -> Optional[Job]:
        """The queued (not yet running) job with ``key``, if any."""
        return self._pending.get(key)

    def submit(self, key: tuple, job: Job) -> None:
        if self.running_key is not None:
            self._pending.pop(key, None)
            self._pending[key] = job
            return
        self._start(key, job)

    def _start(self, key: tuple, job: Job) -> None:
        self.running_key = key
        inner = job.on_done

        def done():
            if inner is not None:
                inner()
            self.running_key = None
            if self.after_each is not None:
                self.after_each()
            if self._pending:
                nxt = next(iter(self._pending))
                self._start(nxt, self._pending.pop(nxt))

        job.on_done = done
        self.executor.run(job)
