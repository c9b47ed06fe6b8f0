"""The routing thread: CPU work off the event loop, every job within its deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.worker_thread import JobTimeout, ThreadStopped, WorkerThread


def spin(seconds: float) -> str:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return "done"


def test_a_job_past_its_deadline_is_interrupted_and_the_thread_goes_on() -> None:
    async def main() -> None:
        thread = WorkerThread()
        started = time.monotonic()
        with pytest.raises(JobTimeout):
            await thread.run(lambda: spin(60), 0.2)
        assert time.monotonic() - started < 1.0
        # the runaway job was stopped: the next one runs at once, on the same thread
        t0 = time.monotonic()
        assert await thread.run(lambda: spin(0.01), 2.0) == "done"
        assert time.monotonic() - t0 < 0.5
        assert thread.interrupted == 1
        thread.stop()

    asyncio.run(main())


def test_the_event_loop_keeps_running_while_a_job_spins() -> None:
    async def main() -> None:
        thread = WorkerThread()
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        with pytest.raises(JobTimeout):
            await thread.run(lambda: spin(60), 0.5)
        tick.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
        # a loop blocked by the job would show one gap as long as the job (0.5 s)
        assert len(ticks) > 10 and max(gaps) < 0.4, max(gaps)
        thread.stop()

    asyncio.run(main())


def test_a_job_whose_deadline_passed_in_the_queue_never_runs() -> None:
    async def main() -> None:
        thread = WorkerThread()
        ran = threading.Event()
        first = asyncio.ensure_future(thread.run(lambda: spin(0.3), 2.0))
        await asyncio.sleep(0.05)
        with pytest.raises(JobTimeout):
            await thread.run(ran.set, 0.1)
        assert await first == "done"
        await thread.run(lambda: None, 1.0)  # everything queued before it has been handled
        assert not ran.is_set() and thread.expired == 1
        thread.stop()

    asyncio.run(main())


def test_exceptions_reach_the_caller_and_posted_work_runs_in_order() -> None:
    async def main() -> None:
        thread = WorkerThread()

        def boom() -> None:
            raise ValueError("bad prompt")

        with pytest.raises(ValueError, match="bad prompt"):
            await thread.run(boom, 1.0)
        seen: list[int] = []
        for i in range(5):
            thread.post(lambda i=i: seen.append(i))
        assert await thread.run(lambda: list(seen), 1.0) == [0, 1, 2, 3, 4]
        names = await thread.run(lambda: threading.current_thread().name, 1.0)
        assert names == "beluga-routing"
        thread.stop()

    asyncio.run(main())


def test_a_caller_cancelled_stops_its_job() -> None:
    async def main() -> None:
        thread = WorkerThread()
        task = asyncio.ensure_future(thread.run(lambda: spin(60), 30.0))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await thread.run(lambda: "next", 1.0) == "next"
        assert thread.interrupted == 1
        thread.stop()

    asyncio.run(main())


def test_work_after_the_stop_is_dropped_or_refused_never_an_error() -> None:
    """A request still in flight at shutdown posts its bookkeeping and may ask for routing
    after the thread stopped: dropped, or a JobTimeout the router turns into an unkeyed
    route, not a RuntimeError from starting a thread twice."""
    async def main() -> None:
        thread = WorkerThread()
        assert await thread.run(lambda: 1, 1.0) == 1
        thread.stop()
        seen: list[int] = []
        thread.post(lambda: seen.append(1))
        with pytest.raises(ThreadStopped, match="stopped") as stopped:
            await thread.run(lambda: 2, 1.0)
        assert stopped.value.reason == "stopped"  # what the router counts it under
        never = WorkerThread()  # stopped before it ever ran
        never.stop()
        never.post(lambda: seen.append(2))
        with pytest.raises(JobTimeout):
            await never.run(lambda: 3, 1.0)
        await asyncio.sleep(0.05)
        assert seen == []

    asyncio.run(main())
