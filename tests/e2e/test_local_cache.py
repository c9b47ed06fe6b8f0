"""What workers hold, from vLLM's KV events, and routing that checks its own predictions.

* A worker without a pool (the session's reference) advertises its prefix cache too: the
  hints come from vLLM's KV events, not from the connector.
* The gateway predicts, per request, the prompt tokens the chosen worker finds cached and
  compares them with what vLLM reports (usage.prompt_tokens_details.cached_tokens): right
  when the keying is right, and a misprediction when it is deliberately broken (a hints
  record with another block size than the engine's)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from beluga.registry import (
    hint_blocks_key,
    hint_key,
    hints_key,
    parse_hints,
    worker_key,
)
from kvpool import block_keys
from kvpool.keys import Adapter, adapter_digest
from tests.e2e.conftest import (
    LORA_NAME,
    MODEL_NAME,
    WORKER_HEADERS,
    Stack,
    extra_gateway,
)
from tests.e2e.pool_helpers import BLOCK, complete, prompt

REF_PREFIX = "beluga:ref"  # the reference worker's registry prefix (conftest.start_worker)


def hint_set(stack: Stack, prefix: str, worker_id: str) -> set[str]:
    members = stack.redis().smembers(hint_blocks_key(prefix, worker_id))
    return {m.decode() if isinstance(m, bytes) else m for m in members}


def wait_for(cond: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_worker_without_a_pool_advertises_its_cache(stack: Stack) -> None:
    wid = stack.reference_url.removeprefix("http://")
    raw = stack.redis().get(hints_key(REF_PREFIX, wid))
    assert raw is not None and (rec := parse_hints(raw)) is not None
    assert rec.pool_uuid is None and rec.block_tokens == BLOCK
    adapter = Adapter(LORA_NAME, adapter_digest(stack.state_dir / "lora"))
    assert rec.adapters == {LORA_NAME: adapter.digest.hex()}
    fp = bytes.fromhex(rec.fingerprint)
    ids = prompt(2417, 4 * BLOCK + 7)
    complete(stack.reference_url, ids, max_tokens=1)
    base = {hint_key(k) for k in block_keys(ids, BLOCK, fp)}
    wait_for(lambda: base <= hint_set(stack, REF_PREFIX, wid), "base blocks not advertised")
    # The same prompt with the adapter: other blocks, under the adapter's keys.
    complete(stack.reference_url, ids, max_tokens=1, model=LORA_NAME)
    lora = {hint_key(k) for k in block_keys(ids, BLOCK, fp, adapter=adapter)}
    assert not lora & base
    wait_for(lambda: lora <= hint_set(stack, REF_PREFIX, wid), "adapter blocks not advertised")


def gateway_counts(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("beluga_gateway_cache_mispredictions_total",
                            "beluga_gateway_cached_tokens_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def chat(url: str, text: str) -> httpx.Response:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r


OVER = 'beluga_gateway_cache_mispredictions_total{direction="over"}'
UNDER = 'beluga_gateway_cache_mispredictions_total{direction="under"}'
PREDICTED = 'beluga_gateway_cached_tokens_total{kind="predicted"}'
ACTUAL = 'beluga_gateway_cached_tokens_total{kind="actual"}'


def test_the_gateway_predicts_what_the_worker_finds_cached(stack: Stack) -> None:
    text = " ".join(f"Fact {j}: the tide at pier {j} turns at {(j * 37) % 24}:00." for j in
                    range(40))
    before = gateway_counts(stack.base_url)
    first = chat(stack.base_url, text)
    time.sleep(2.5)  # the worker's hints refresh, the gateway's registry refresh
    second = chat(stack.base_url, text)
    after = gateway_counts(stack.base_url)
    assert second.headers["x-beluga-worker"] == first.headers["x-beluga-worker"]
    cached = after[ACTUAL] - before[ACTUAL]
    assert cached >= 8 * BLOCK  # the second request found the prompt's blocks
    assert after[PREDICTED] - before[PREDICTED] == cached
    assert after[OVER] == before[OVER] and after[UNDER] == before[UNDER]


BROKEN_TEXT = " ".join(f"Entry {j}: lantern {j} hangs {(j * 53) % 97} meters up."
                       for j in range(40))  # never sent before: no worker holds it


def list_broken(stack: Stack, prefix: str) -> None:
    """Worker A under `prefix`, with a hints record that says 16-token blocks (the engine's
    are 32) and lists BROKEN_TEXT's blocks keyed that way: a hint publisher that keys
    differently from the engine."""
    a = stack.workers()[0]
    client = stack.redis()
    raw = client.get(hints_key("beluga:v1", a.id))
    assert raw is not None and (real := parse_hints(raw)) is not None
    assert real.block_tokens == BLOCK
    tokens = httpx.post(f"{a.url}/tokenize", headers=WORKER_HEADERS, timeout=30, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": BROKEN_TEXT}],
    }).json()["tokens"]
    claimed = [hint_key(k) for k in block_keys(tokens, 16, bytes.fromhex(real.fingerprint))]
    record = real.model_copy(update={"block_tokens": 16, "keys": len(claimed),
                                     "updated_at": time.time(), "pool_uuid": None,
                                     "pool_path": None})
    worker = a.model_copy(update={"heartbeat_at": time.time(), "running": 0, "waiting": 0})
    client.set(worker_key(prefix, a.id), worker.to_json(), ex=300)
    client.set(hints_key(prefix, a.id), record.to_json(), ex=300)
    client.delete(hint_blocks_key(prefix, a.id))
    client.sadd(hint_blocks_key(prefix, a.id), *claimed)
    client.expire(hint_blocks_key(prefix, a.id), 300)


@pytest.fixture(scope="module")
def broken_gateway(stack: Stack) -> Iterator[str]:
    """A gateway (prefix_affinity) on a registry prefix of its own, where the stack's
    worker A is listed by `list_broken`."""
    prefix = "beluga:broken"
    list_broken(stack, prefix)
    with extra_gateway(stack, "gateway-broken", redis_key_prefix=prefix,
                       routing_policy="prefix_affinity") as url:
        yield url


def test_a_broken_keying_shows_up_as_mispredictions(stack: Stack, broken_gateway: str) -> None:
    list_broken(stack, "beluga:broken")  # a fresh heartbeat
    time.sleep(2.5)  # the gateway's registry and hints refresh
    before = gateway_counts(broken_gateway)
    r = chat(broken_gateway, BROKEN_TEXT)
    after = gateway_counts(broken_gateway)
    assert r.headers["x-beluga-route"] == "prefix"  # routed on the (wrong) hints
    assert after[OVER] - before[OVER] == 1
    assert after[PREDICTED] - before[PREDICTED] >= 8 * 16
    assert after[ACTUAL] - before[ACTUAL] == 0
