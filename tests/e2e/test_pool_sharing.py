"""BelugaConnector end to end: the stack's two workers (A, B) share KV blocks through one
pool, checked against a cold worker without the connector (the reference). Prompt by prompt
reuse correctness is tests/e2e/test_reuse.py.

Prompts are token ids (the completions API accepts them), so block boundaries are exact
(BLOCK tokens, the stack's block size).
"""

from __future__ import annotations

import ctypes
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from beluga.pool_lookup import LOOKUP_PATH, request_body
from beluga.registry import hint_blocks_key, hint_key
from kvpool import block_keys
from tests.e2e.conftest import WORKER_HEADERS, Stack
from tests.e2e.pool_helpers import BLOCK, complete, delta, metrics, pool_of, prompt


def test_b_loads_the_full_blocks_and_computes_only_the_rest(stack: Stack) -> None:
    a, b = stack.worker_urls
    ids = prompt(3031, 1000)  # full blocks and a partial one
    full = 1000 // BLOCK
    before_a, before_b = metrics(a), metrics(b)
    complete(a, ids)
    mid_b = metrics(b)
    complete(b, ids)
    after_a, after_b = metrics(a), metrics(b)
    assert delta(after_a, before_a, "beluga_worker_pool_blocks_saved_total") == full
    assert delta(after_a, before_a, "beluga_worker_pool_save_bytes_total") > 0
    assert delta(mid_b, before_b, "beluga_worker_prompt_tokens_total:pool") == 0
    assert delta(after_b, mid_b, "beluga_worker_prompt_tokens_total:pool") == full * BLOCK
    assert delta(after_b, mid_b, "beluga_worker_prompt_tokens_total:computed") == (
        1000 - full * BLOCK)
    assert delta(after_b, mid_b, "beluga_worker_prompt_tokens_total:local") == 0
    assert delta(after_b, mid_b, "beluga_worker_pool_blocks_loaded_total") == full
    assert after_b["beluga_worker_pool_enabled"] == 1
    # The bytes B loaded are in the pool under DESIGN.md's keys, intact.
    with pool_of(stack) as pool:
        keys = block_keys(ids, BLOCK, pool.fingerprint)
        assert len(keys) == full and pool.lookup_prefix(keys) == full
        assert len(pool.get(keys)) == full  # get() checks every block's checksum
        uuid = str(pool.uuid)
        unseen = block_keys(prompt(3032, BLOCK), BLOCK, pool.fingerprint)
    # Both workers answer the pool lookup (for gateways on hosts without the pool) inside
    # vLLM's API server, with the leading blocks the pool holds.
    for url in (a, b):
        resp = httpx.post(url + LOOKUP_PATH, content=request_body(uuid, keys + unseen),
                          headers={"content-type": "application/json", **WORKER_HEADERS},
                          timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"version": 1, "pool_uuid": uuid, "blocks": full}


def test_a_scribbled_block_is_recomputed_not_used(stack: Stack) -> None:
    a, b = stack.worker_urls
    ids = prompt(4107, 4 * BLOCK + BLOCK // 2)  # 4 full blocks
    ref = complete(stack.reference_url, ids)
    assert complete(a, ids) == ref
    with pool_of(stack) as pool:
        keys = block_keys(ids, BLOCK, pool.fingerprint)
        with pool.pinned(keys) as slots:
            assert len(slots) == 4
            addr = pool._p.slot_address(slots[1]) + 5000
            junk = bytes(range(256)) * 4
            ctypes.memmove(addr, junk, len(junk))  # a stray writer hits block 1
        assert len(pool.get(keys)) == 1  # the checksum catches it
    before = metrics(b)
    assert complete(b, ids) == ref  # recomputed from block 1 on, never used
    after = metrics(b)
    assert delta(after, before, "beluga_worker_pool_load_errors_total") >= 1
    # The bad block left the pool and B stored its recomputed copy: whole again.
    with pool_of(stack) as pool:
        deadline = time.monotonic() + 10
        while len(pool.get(keys)) != 4:
            assert time.monotonic() < deadline, "the recomputed block was not stored"
            time.sleep(0.2)
        assert pool.stats().pinned_slots == 0


def test_workers_publish_which_blocks_their_local_cache_holds(stack: Stack) -> None:
    a, _ = stack.worker_urls
    ids = prompt(1513, 5 * BLOCK + 60 % BLOCK)  # 5 full blocks
    complete(a, ids)
    with pool_of(stack) as pool:
        want = {hint_key(k).encode() for k in block_keys(ids, BLOCK, pool.fingerprint)}
    worker_id = a.removeprefix("http://")
    client = stack.redis()
    deadline = time.monotonic() + 10
    while not want <= client.smembers(hint_blocks_key("beluga:v1", worker_id)):
        assert time.monotonic() < deadline, "A's hints never listed the prompt's blocks"
        time.sleep(0.2)
    assert 0 < client.ttl(hint_blocks_key("beluga:v1", worker_id)) <= 15


def test_a_mismatched_pool_means_serving_without_sharing(stack: Stack) -> None:
    ids = prompt(2519, 300)
    assert complete(stack.mismatch_url, ids) == complete(stack.reference_url, ids)
    m = metrics(stack.mismatch_url)
    assert m["beluga_worker_pool_enabled"] == 0
    assert m.get("beluga_worker_pool_blocks_loaded_total", 0) == 0
    warnings = [line for line in stack.mismatch_log.read_text().splitlines()
                if "serving WITHOUT KV sharing" in line]
    assert len(warnings) == 1, warnings
    assert "fingerprint" in warnings[0] or "slot" in warnings[0]


def test_no_pins_leak_across_concurrent_requests(stack: Stack) -> None:
    """Several requests at once on B, all loading from the pool: every pin is released."""
    a, b = stack.worker_urls
    cases = [prompt(3317 + 171 * i, 400 + 50 * i) for i in range(3)]
    for ids in cases:
        complete(a, ids)
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda ids: complete(b, ids), cases))
    with pool_of(stack) as pool:
        assert pool.stats().pinned_slots == 0 and pool.stats().writing_slots == 0
