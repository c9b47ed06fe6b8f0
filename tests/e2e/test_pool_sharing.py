"""BelugaConnector end to end: the stack's two workers (A, B) share KV blocks through one
pool, checked against a cold worker without the connector (the reference).

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

# Lengths around block boundaries: shorter than a block, exactly aligned, just past, long.
LENGTHS = [BLOCK // 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1,
           3 * BLOCK, 200, 255, 256, 257, 383, 500, 640, 777, 1024, 1100, 1500, 1900]


def test_outputs_from_the_pool_equal_a_worker_without_the_connector(stack: Stack) -> None:
    """Token for token, for prompts of every shape. The reference is a worker without the
    connector; it answers each prompt twice: cold, then from its own prefix cache.

    * A (with the connector, computing cold) must equal the reference's cold answer: the
      connector does not change what the engine computes.
    * B (loading the prompt's full blocks from the pool) must equal the reference's answer
      from its prefix cache: a pool hit leaves the engine exactly where a local hit does,
      bit for bit. In bf16 that answer can itself differ from the cold one (vLLM computes
      the suffix in a separate pass; on near-ties greedy decoding flips): that is vLLM's
      prefix caching, with or without Beluga, and is counted, not asserted.
    """
    a, b = stack.worker_urls
    cases = [prompt(200 * i, n) for i, n in enumerate(LENGTHS)]
    # Sharing only part of a prefix with an earlier prompt (which A and B both served).
    cases += [cases[13][:384] + prompt(5000, 150), cases[17][:700] + prompt(5200, 301),
              cases[19][:1000] + prompt(4500, 44)]
    before_b = metrics(b)
    mismatches = []
    cold_equal = 0
    for ids in cases:
        ref_cold = complete(stack.reference_url, ids)
        ref_cached = complete(stack.reference_url, ids)
        got_a = complete(a, ids)   # computes and fills the pool
        got_b = complete(b, ids)   # never saw it: loads its full blocks from the pool
        if got_a != ref_cold or got_b != ref_cached:
            mismatches.append((len(ids), ref_cold, ref_cached, got_a, got_b))
        cold_equal += got_b == ref_cold
    assert not mismatches, mismatches
    assert cold_equal >= len(cases) // 2  # most prompts have no near-tie at all
    after_b = metrics(b)
    # B really loaded: every prompt's full blocks beyond what B had locally.
    assert delta(after_b, before_b, "beluga_worker_prompt_tokens_total:pool") >= 5000
    assert delta(after_b, before_b, "beluga_worker_pool_load_errors_total") == 0
    with pool_of(stack) as pool:
        assert pool.stats().pinned_slots == 0  # every promise was released


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
