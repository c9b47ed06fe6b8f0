"""A worker killed with SIGKILL while requests continue: they succeed on the other worker.

Runs last in the session: it leaves the stack with one worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil

from tests.e2e.conftest import MODEL_NAME, Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_sigkill_a_worker_mid_traffic(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)
    workers = stack.workers()
    assert len(workers) == 2
    victim, survivor = workers
    victim_procs = [psutil.Process(victim.pid)] + psutil.Process(victim.pid).children(
        recursive=True)
    started = threading.Event()

    def ask(i: int) -> tuple[str, str]:
        started.set()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=30)
        return raw.headers["x-beluga-worker"], raw.parse().choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, i) for i in range(12)]
        started.wait(10)
        time.sleep(0.3)
        os.killpg(victim.pid, signal.SIGKILL)  # the worker, its vLLM server and engine
        results = [f.result() for f in futures]

    assert all("Paris" in text for _, text in results), results
    _gone, alive = psutil.wait_procs(victim_procs, timeout=10)
    assert not alive
    # After the kill, new requests all land on the survivor.
    for _ in range(3):
        worker, text = ask(0)
        assert worker == survivor.id and "Paris" in text
    deadline = time.monotonic() + 15
    while len(stack.workers()) != 1:  # the dead worker's registry entry expires (TTL)
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert stack.proc.poll() is None, "beluga up must survive a worker crash"
