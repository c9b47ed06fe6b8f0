"""A LoRA adapter (tests/e2e/lora.py, served by every worker of the session) and the base
model never share a KV block, in a worker's own cache or in the pool, and every answer
equals the cold answer of its own configuration on the reference worker (no pool)."""

from __future__ import annotations

import httpx

from kvpool import block_keys
from kvpool.keys import Adapter, adapter_digest
from tests.e2e.conftest import LORA_NAME, MODEL_NAME, Stack
from tests.e2e.pool_helpers import BLOCK, complete, delta, metrics, pool_of, prompt


def test_an_adapter_and_the_base_model_never_share_a_block(stack: Stack) -> None:
    a, b = stack.worker_urls
    ref = stack.reference_url
    ids = prompt(3571, 6 * BLOCK + 5)
    cold = {m: complete(ref, ids, model=m) for m in (MODEL_NAME, LORA_NAME)}
    cached = {m: complete(ref, ids, model=m) for m in (MODEL_NAME, LORA_NAME)}
    assert cold[MODEL_NAME] != cold[LORA_NAME]  # the adapter changes the answer
    before_a, before_b = metrics(a), metrics(b)
    assert complete(a, ids, model=MODEL_NAME) == cold[MODEL_NAME]  # base blocks -> pool
    mid_b = metrics(b)
    # B has the base model's blocks in the pool, not the adapter's: it computes them all.
    assert complete(b, ids, model=LORA_NAME) == cold[LORA_NAME]
    after_b = metrics(b)
    assert delta(after_b, mid_b, "beluga_worker_prompt_tokens_total:pool") == 0
    # A's adapter request loads the adapter blocks B stored (its own cache holds only the
    # base model's), and answers as a prefix-cache hit of that configuration does.
    mid_a = metrics(a)
    assert complete(a, ids, model=LORA_NAME) == cached[LORA_NAME]
    assert delta(metrics(a), mid_a, "beluga_worker_prompt_tokens_total:pool") == 6 * BLOCK
    assert delta(metrics(a), before_a, "beluga_worker_pool_unshared_requests_total") == 0
    assert delta(after_b, before_b, "beluga_worker_pool_load_errors_total") == 0
    with pool_of(stack) as pool:
        adapter = Adapter(LORA_NAME, adapter_digest(stack.state_dir / "lora"))
        base = block_keys(ids, BLOCK, pool.fingerprint)
        lora = block_keys(ids, BLOCK, pool.fingerprint, adapter=adapter)
        assert not set(base) & set(lora)
        assert pool.lookup_prefix(base) == 6 and pool.lookup_prefix(lora) == 6


def test_the_gateway_routes_an_adapter_by_its_name(stack: Stack) -> None:
    models = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()
    assert {MODEL_NAME, LORA_NAME} <= {m["id"] for m in models["data"]}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=300, json={
        "model": LORA_NAME, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Say something."}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == LORA_NAME
    assert r.headers["x-beluga-worker"] in {w.id for w in stack.workers()}
