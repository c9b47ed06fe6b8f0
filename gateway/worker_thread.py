"""One thread for the gateway's CPU work on client input, with a deadline per job.

Chat templating, tokenizing and block-key hashing of a prompt are CPU work whose cost a
client chooses (a long prompt, many messages, a template's loops). None of it runs on the
event loop: jobs run one at a time on this thread (so the tokenizer's caches and the prefix
index's per-request state are only ever touched by it), and the loop awaits each with a
deadline. A job still running at its deadline is interrupted: `Interrupted` is raised in the
thread at its next Python instruction (`PyThreadState_SetAsyncExc`; a Rust tokenizer call
is bounded by the size of its input and is interrupted when it returns). A job whose
deadline passed while it waited in the queue does not run at all. So a hostile prompt costs
at most its deadline of one core, never a stalled event loop, and the thread is never stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Interrupted(BaseException):  # noqa: N818 - BaseException: `except Exception` in
    """Raised inside a job at its deadline."""  # templates and tokenizers must not stop it


class JobTimeout(TimeoutError):
    """A job did not finish by its deadline (it was interrupted or never started)."""

    reason = "timeout"  # (the label a request routed without its job counts under)


class ThreadStopped(JobTimeout):
    """A job submitted after the thread stopped (a request still in flight at shutdown)."""

    reason = "stopped"


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    deadline: float | None  # time.monotonic(); None: none (bookkeeping posted by the loop)
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[T] | None = None
    done: bool = field(default=False)


def _set_async_exc(ident: int, exc: type[BaseException] | None) -> int:
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None))


class WorkerThread:
    """Runs submitted callables one at a time on its own daemon thread."""

    def __init__(self, name: str = "beluga-routing", max_queue: int = 4096) -> None:
        self._queue: queue.Queue[_Job[Any] | None] = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._current: _Job[Any] | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = False
        self._stopped = False  # for good: a thread starts once
        self.interrupted = 0  # jobs stopped at their deadline
        self.expired = 0      # jobs whose deadline passed before they started
        self.failed = 0       # jobs that raised

    def start(self) -> None:
        if not self._started and not self._stopped:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        if self._started:
            self._started = False
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)

    async def run(self, fn: Callable[[], T], timeout_s: float) -> T:
        """`fn()` on the thread, its result or exception; JobTimeout past `timeout_s` (the
        time in the queue included), after which `fn` is interrupted or never started; at
        once once the thread has stopped (a request still in flight at shutdown)."""
        if self._stopped:
            raise ThreadStopped("the routing thread has stopped")
        self.start()
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, time.monotonic() + timeout_s, loop, loop.create_future())
        assert job.future is not None
        job.future.add_done_callback(_retrieve)  # its outcome may come after nobody waits
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise JobTimeout("the routing queue is full") from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except TimeoutError:
            self._interrupt(job)
            raise JobTimeout(f"not done in {timeout_s:g} s") from None
        except asyncio.CancelledError:
            self._interrupt(job)
            raise

    def post(self, fn: Callable[[], object]) -> None:
        """Run `fn()` on the thread some time soon; nobody waits for it (bookkeeping).
        Dropped, with a log line, if the queue is full; dropped once the thread has stopped
        (bookkeeping of a request that ended after shutdown)."""
        if self._stopped:
            logger.debug("the routing thread has stopped; dropping bookkeeping")
            return
        self.start()
        try:
            self._queue.put_nowait(_Job(fn, None))
        except queue.Full:
            logger.warning("the routing thread's queue is full; dropping bookkeeping")

    def _interrupt(self, job: _Job[Any]) -> None:
        job.deadline = 0.0  # not started yet: never will be
        with self._lock:
            if self._current is job and self._thread.ident is not None:
                _set_async_exc(self._thread.ident, Interrupted)

    def _main(self) -> None:
        while True:
            try:
                if not self._serve():
                    return
            except Interrupted:  # landed between two jobs: nothing to stop any more
                with self._lock:
                    self._current = None
            except Exception:  # a bug here must not end the thread
                logger.exception("routing thread failed")

    def _serve(self) -> bool:
        while True:
            job = self._queue.get()
            if job is None:
                return False
            if job.deadline is not None and time.monotonic() >= job.deadline:
                self.expired += 1
                _resolve(job, None, JobTimeout("expired in the queue"))
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                try:
                    with self._lock:
                        self._current = job
                    result = job.fn()
                finally:
                    with self._lock:
                        self._current = None
                        assert self._thread.ident is not None
                        _set_async_exc(self._thread.ident, None)  # one pending: cleared
            except Interrupted:
                with self._lock:
                    self._current = None
                self.interrupted += 1
                error = JobTimeout("interrupted at its deadline")
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits
                self.failed += 1
                error = exc
                if job.future is None:
                    logger.exception("routing bookkeeping failed")
            _resolve(job, result, error)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _resolve(job: _Job[Any], result: Any, error: BaseException | None) -> None:
    if job.loop is None or job.future is None:
        return
    fut = job.future

    def settle() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        job.loop.call_soon_threadsafe(settle)
