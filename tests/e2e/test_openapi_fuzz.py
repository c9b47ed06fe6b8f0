"""schemathesis against the running stack: generated requests, valid and broken, go through
the gateway to real vLLM workers. No 5xx, every answer as /openapi.json documents it, none
slower than the timeout (no hang). Token counts are capped so the run stays short on a CPU.

The requests are drawn from a fixed seed (tests/fuzz.py): every run sends the same ones, so
this test cannot pass or fail by luck. The long randomized run is bench/fuzz_gateway.py."""

from __future__ import annotations

from tests.e2e.conftest import MODEL_NAME, Stack
from tests.fuzz import SEED, capped, fuzz


def test_generated_requests_through_real_workers(stack: Stack) -> None:
    labels = fuzz(stack.base_url, capped(MODEL_NAME), examples=25, timeout_s=60, seed=SEED)
    assert "POST /v1/chat/completions" in labels
