"""Pool-aware routing end to end: the gateway tokenizes as vLLM does, a worker advertises
what its cache holds, and two gateways on one Redis send one prefix to one worker."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from beluga.registry import hint_blocks_key, hint_key, hints_key, parse_hints
from gateway.tokenize import PromptTokenizer
from kvpool import block_keys
from tests.e2e.conftest import MODEL, MODEL_NAME, WORKER_HEADERS, Stack, extra_gateway
from tests.e2e.pool_helpers import BLOCK, complete, prompt

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name three rivers."},
     {"role": "assistant", "content": "Nile, Amazon, Danube."},
     {"role": "user", "content": "And three mountains? Ünïcödé ✓"}],
    [{"role": "user", "content": "word " * 300}],
]


def test_the_gateway_tokenizes_exactly_as_vllm(stack: Stack) -> None:
    tok = PromptTokenizer({MODEL_NAME: MODEL})
    worker = stack.worker_urls[0]
    for messages in CHATS:
        vllm = httpx.post(f"{worker}/tokenize", json={"model": MODEL_NAME,
                                                      "messages": messages}, timeout=30,
                          headers=WORKER_HEADERS)
        assert vllm.status_code == 200, vllm.text
        ours = tok.tokens(MODEL_NAME, "chat", {"messages": messages})
        assert ours == vllm.json()["tokens"]
    for text in ("Once upon a time", "  spaces\tand\nnewlines  ", "x" * 2000):
        vllm = httpx.post(f"{worker}/tokenize", json={"model": MODEL_NAME, "prompt": text},
                          timeout=30, headers=WORKER_HEADERS)
        assert tok.tokens(MODEL_NAME, "completions", {"prompt": text}) == \
            vllm.json()["tokens"]


@pytest.fixture(scope="module")
def second_gateway(stack: Stack) -> Iterator[str]:
    with extra_gateway(stack, "gateway2") as url:
        yield url


def test_two_gateways_send_one_prefix_to_one_worker(stack: Stack, second_gateway: str) -> None:
    gateways = [stack.base_url, second_gateway]
    for i in range(6):
        # A new long prompt (several full blocks) each time, first seen by alternating
        # gateways: both must pick the same worker, without talking to each other.
        text = " ".join(f"Note {i}-{j}: the value of item {j} is {(i * 131 + j * 17) % 997}."
                        for j in range(50))
        body = {"model": MODEL_NAME, "max_tokens": 1,
                "messages": [{"role": "user", "content": text}]}
        picked: list[str] = []
        reasons: list[str] = []
        for g in (gateways if i % 2 == 0 else gateways[::-1]):
            # A gateway knows other traffic's load only from the workers' heartbeats: let
            # them report idle first (a stale "running: 1" is a fair reason to balance to
            # the other worker, which is not what this test is about).
            idle_since = time.time()
            deadline = time.monotonic() + 10
            while not all(w.heartbeat_at > idle_since and w.running + w.waiting == 0
                          for w in stack.workers()):
                assert time.monotonic() < deadline, stack.workers()
                time.sleep(0.1)
            time.sleep(1.2)  # one registry refresh of the gateways
            r = httpx.post(f"{g}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            picked.append(r.headers["x-beluga-worker"])
            reasons.append(r.headers["x-beluga-route"])
        assert picked[0] == picked[1], (i, picked, reasons, worker_views(gateways))
    for g in gateways:  # nothing open, nothing counted as waiting to be computed
        for w in httpx.get(f"{g}/health", timeout=10).json()["workers"]:
            assert (w["in_flight"], w["pending_prefill_tokens"]) == (0, 0), (g, w)


def worker_views(gateways: list[str]) -> dict[str, list[str]]:
    """Each gateway's view of the workers (health, open requests, load), for a failure."""
    return {g: [line for line in httpx.get(f"{g}/metrics", timeout=10).text.splitlines()
                if line.startswith("beluga_gateway_worker_")] for g in gateways}


def test_a_worker_advertises_what_it_served_last_when_it_goes_idle(stack: Stack) -> None:
    """Hints are offered at most once per interval as vLLM's KV events arrive; the blocks
    of requests that ran since the last offer are offered when the events stop (the worker
    goes idle), not at its next request (a gateway would not see them until then)."""
    worker = stack.workers()[0]
    client = stack.redis()
    raw = client.get(hints_key("beluga:v1", worker.id))
    assert raw is not None and (rec := parse_hints(raw)) is not None
    first, last = prompt(2777, 2 * BLOCK + 5), prompt(3901, 3 * BLOCK + 5)
    complete(worker.url, first, max_tokens=1)
    complete(worker.url, last, max_tokens=1)  # within one hint interval of `first`
    want = {hint_key(k) for k in block_keys(last, rec.block_tokens,
                                             bytes.fromhex(rec.fingerprint))}
    assert len(want) == 3
    deadline = time.monotonic() + 5
    while True:
        held = {m.decode() for m in client.smembers(hint_blocks_key("beluga:v1", worker.id))}
        if want <= held:
            break
        assert time.monotonic() < deadline, f"{len(want - held)} of 3 blocks not advertised"
        time.sleep(0.2)
