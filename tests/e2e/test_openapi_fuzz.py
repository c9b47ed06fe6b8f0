"""schemathesis against the running stack: generated requests, valid and broken, go through
the gateway to real vLLM workers. No 5xx, every answer as /openapi.json documents it, none
slower than the timeout (no hang). Token counts are capped so the run stays short on a CPU."""

from __future__ import annotations

import schemathesis

from tests.e2e.conftest import MODEL_NAME, Stack
from tests.fuzz import aim_at, fuzz

aim = aim_at(MODEL_NAME)


def small(case: schemathesis.Case) -> None:
    aim(case)
    body = case.body
    if not isinstance(body, dict):
        return
    for name, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        if name not in body:
            continue
        value = body[name]
        # A valid value stays valid, an invalid one stays invalid. null is valid and means
        # "up to the context length": ~2,000 tokens on a shared CPU core ran past the
        # timeout (and hypothesis shrank it for 8 minutes more).
        if value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and value > cap):
            body[name] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4


def test_generated_requests_through_real_workers(stack: Stack) -> None:
    labels = fuzz(stack.base_url, small, examples=25, timeout_s=60)
    assert "POST /v1/chat/completions" in labels
