"""A client that disconnects mid-stream cancels the request on the worker."""

from __future__ import annotations

import time

import httpx

from tests.e2e.conftest import MODEL_NAME, Stack, worker_running


def test_client_disconnect_cancels_upstream(stack: Stack, http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "Count forever: 1, 2, 3,", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        worker = next(w for w in stack.workers() if w.id == resp.headers["x-beluga-worker"])
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert worker_running(worker.url) == 1
        # Open, but its prompt is computed: no prefill pending there (what routing weighs).
        assert gateway_view(stack, worker.id) == (1, 0)
    # 1,500 tokens would take far longer than this; the worker must drop the request.
    deadline = time.monotonic() + 15
    while worker_running(worker.url) != 0:
        assert time.monotonic() < deadline, "upstream request still running after disconnect"
        time.sleep(0.5)
    deadline = time.monotonic() + 5
    while gateway_view(stack, worker.id) != (0, 0):
        assert time.monotonic() < deadline, gateway_view(stack, worker.id)
        time.sleep(0.1)


def gateway_view(stack: Stack, worker_id: str) -> tuple[int, int]:
    """The gateway's open requests and pending prefill tokens on a worker (/health)."""
    workers = httpx.get(f"{stack.base_url}/health", timeout=10).json()["workers"]
    w = next(w for w in workers if w["id"] == worker_id)
    return w["in_flight"], w["pending_prefill_tokens"]
