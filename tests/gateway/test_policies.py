from __future__ import annotations

import pytest

from beluga.registry import WorkerRecord
from gateway.policies import POLICIES, RequestInfo, make_policy
from gateway.workers import WorkerState

REQ = RequestInfo(model="m", endpoint="chat", stream=False)


def make_worker(wid: str, running: int = 0, waiting: int = 0, in_flight: int = 0,
                capacity: int = 8) -> WorkerState:
    rec = WorkerRecord.model_validate({
        "schema": 1, "id": wid, "url": f"http://{wid}", "model": "m", "capacity": capacity,
        "pid": 1, "started_at": 0.0, "heartbeat_at": 0.0, "running": running,
        "waiting": waiting})
    return WorkerState(record=rec, in_flight=in_flight)


def test_least_loaded_picks_the_emptiest_worker() -> None:
    policy = make_policy("least_loaded")
    workers = [make_worker("a", running=3), make_worker("b", running=1),
               make_worker("c", in_flight=2)]
    choice = policy.select(workers, REQ)
    assert choice is not None and choice.worker.id == "b" and choice.reason == "least_loaded"


def test_load_is_relative_to_capacity_and_counts_the_queue() -> None:
    policy = make_policy("least_loaded")
    big = make_worker("big", running=4, capacity=32)
    small = make_worker("small", running=2, capacity=4)
    queued = make_worker("queued", running=0, waiting=5, capacity=32)
    choice = policy.select([small, big, queued], REQ)
    assert choice is not None and choice.worker.id == "big"


def test_a_report_older_than_our_last_completion_is_ignored() -> None:
    policy = make_policy("least_loaded")
    stale = make_worker("a", running=1)  # heartbeat_at=0.0: sampled before...
    stale.begin()
    stale.done()  # ...this request finished, so its "running=1" is that request
    busy = make_worker("b", running=1)
    choice = policy.select([busy, stale], REQ)
    assert choice is not None and choice.worker.id == "a"
    assert stale.in_flight == 0 and stale.load() == 0


def test_ties_rotate() -> None:
    policy = make_policy("least_loaded")
    workers = [make_worker("a"), make_worker("b")]
    picks = []
    for _ in range(4):
        choice = policy.select(workers, REQ)
        assert choice is not None
        picks.append(choice.worker.id)
    assert picks == ["a", "b", "a", "b"]


def test_no_workers_means_no_choice() -> None:
    assert make_policy("least_loaded").select([], REQ) is None


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")
    assert "least_loaded" in POLICIES


def keyed(local: dict[str, int], pool: int = 0, tokens: int = 1000) -> RequestInfo:
    return RequestInfo(model="m", endpoint="chat", stream=True, prompt_tokens=tokens,
                       block_tokens=128, keys=(b"k" * 32,), local_blocks=local,
                       pool_blocks=pool)


def test_every_policy_is_registered_and_pool_aware_is_the_default() -> None:
    from beluga.settings import Settings
    assert set(POLICIES) == {"round_robin", "least_loaded", "prefix_affinity", "pool_aware"}
    assert Settings().routing_policy == "pool_aware"


def test_round_robin_ignores_load_and_prefixes() -> None:
    policy = make_policy("round_robin")
    workers = [make_worker("b", running=7), make_worker("a")]
    picks = [policy.select(workers, keyed({"b": 7})) for _ in range(4)]
    assert [c.worker.id for c in picks if c] == ["a", "b", "a", "b"]


def test_prefix_affinity_follows_the_longest_cached_prefix() -> None:
    policy = make_policy("prefix_affinity")
    workers = [make_worker("a"), make_worker("b", running=2), make_worker("c")]
    choice = policy.select(workers, keyed({"a": 1, "b": 5, "c": 0}))
    assert choice is not None and (choice.worker.id, choice.reason) == ("b", "prefix")


def test_prefix_affinity_falls_back_when_the_holder_is_overloaded() -> None:
    policy = make_policy("prefix_affinity")
    workers = [make_worker("a", running=8), make_worker("b")]  # a: occupancy 1.0
    choice = policy.select(workers, keyed({"a": 5}))
    assert choice is not None and (choice.worker.id, choice.reason) == ("b", "balance")


def test_a_new_prefix_goes_to_the_same_worker_from_every_gateway() -> None:
    workers = [make_worker(w) for w in "abcd"]
    picks = set()
    for _ in range(5):  # fresh policy objects: separate gateways
        for name in ("prefix_affinity", "pool_aware"):
            choice = make_policy(name).select(workers, keyed({}))
            assert choice is not None
            picks.add(choice.worker.id)
    assert len(picks) == 1
    other = RequestInfo(model="m", endpoint="chat", stream=True, prompt_tokens=1000,
                        block_tokens=128, keys=(b"z" * 32,))
    spread = {make_policy("prefix_affinity").select(workers, RequestInfo(
        model="m", endpoint="chat", stream=True, keys=(bytes([i]) * 32,))).worker.id  # type: ignore[union-attr]
        for i in range(40)}
    assert len(spread) == 4 and other.keys  # different prefixes spread over all workers


def test_pool_aware_prefers_local_then_pool_then_weighs_the_queue() -> None:
    policy = make_policy("pool_aware")
    a, b = make_worker("a"), make_worker("b")
    # a holds 6 of 7 blocks locally; the pool holds all 7 for b: both cheap, a cheaper.
    c = policy.select([a, b], keyed({"a": 6}, pool=7))
    assert c is not None and (c.worker.id, c.reason) == ("a", "local")
    # Nobody holds it locally, the pool does: either loads it (reason pool).
    c = policy.select([a, b], keyed({}, pool=7))
    assert c is not None and c.reason == "pool"
    # a holds it but has 4 requests queued; b can load it from the pool: b wins.
    busy = make_worker("a", running=4)
    c = policy.select([busy, b], keyed({"a": 7}, pool=7))
    assert c is not None and (c.worker.id, c.reason) == ("b", "balance")
    # Without the pool, b would compute 1000 tokens (2.6 s) vs 4 requests queued on a:
    c = policy.select([busy, b], keyed({"a": 7}, pool=0))
    assert c is not None and c.worker.id == "b" and c.estimate_s is not None


def test_pool_aware_learns_its_costs_from_measured_ttfts() -> None:
    from gateway.policies.pool_aware import CostModel, PoolAware
    policy = PoolAware(CostModel(prefill=0.1, load=1.0))  # wrong priors: loading looks slow
    w = make_worker("a")
    for tokens, pool in [(1000, 0), (2000, 0), (1500, 10), (3000, 23), (800, 5)] * 60:
        req = keyed({}, pool=pool, tokens=tokens)
        choice = policy.select([w], req)
        assert choice is not None
        computed = max(0, tokens - pool * 128)
        true_ttft = 0.05 + 2.6 * computed / 1000 + 0.02 * (tokens - computed) / 1000
        policy.observe(choice, req, true_ttft)
    m = policy.model
    assert m.observations == 300
    assert abs(m.prefill - 2.6) < 0.3 and m.load < 0.3


def test_the_cost_model_stays_finite_when_a_feature_never_varies() -> None:
    from gateway.policies.pool_aware import CostModel
    m = CostModel()
    for _ in range(20000):  # queue always 0, pool always 0
        m.learn(0, 1000, 0, 2.65)
    assert abs(m.predict(0, 1000, 0) - 2.65) < 0.01
    assert all(abs(v) < 1e6 for row in m.p for v in row)


def test_pool_aware_counts_the_prefill_work_queued_ahead() -> None:
    """One request open on each worker: on a, a cold 3,000-token prompt still prefilling; on
    b, one whose first token is back (decoding). Request counts tie; the work does not."""
    policy = make_policy("pool_aware")
    a, b = make_worker("a"), make_worker("b")
    a.begin(prefill=3000)
    b.begin(prefill=2000)
    b.prefilled(2000)
    c = policy.select([a, b], keyed({}, tokens=1000))
    assert c is not None and (c.worker.id, c.reason) == ("b", "cold")
    assert c.prefill_tokens == 1000
    # a holds this prompt locally, but its queue is 3,000 tokens of someone else's prefill;
    # b computes 1,000: b, passed over for balance.
    c = policy.select([a, b], keyed({"a": 7}, tokens=1000))
    assert c is not None and (c.worker.id, c.reason) == ("b", "balance")
    assert c.features[1] == 1000   # what it learns from: the tokens it waited for
    # Once a's first token is back, a's local copy wins again.
    a.prefilled(3000)
    c = policy.select([a, b], keyed({"a": 7}, tokens=1000))
    assert c is not None and (c.worker.id, c.reason) == ("a", "local")
    assert c.prefill_tokens == 104   # 1000 - 7 x 128


def test_pending_prefill_is_released_by_the_first_token_or_the_end() -> None:
    w = make_worker("a")
    w.begin(prefill=500)
    w.begin(prefill=300)
    assert w.pending_prefill == 800
    w.prefilled(500)            # the first request's first token
    assert w.pending_prefill == 300
    w.done(0)                   # ... and its end
    w.done(300)                 # the second ended before its first token (error, timeout)
    assert (w.in_flight, w.pending_prefill) == (0, 0)
    w.begin(prefill=100)
    w.prefilled(400)            # never below zero
    assert w.pending_prefill == 0
    w.begin(prefill=50)
    w.done(0)                   # a missed release cannot outlive the last open request
    w.done(0)
    assert (w.in_flight, w.pending_prefill) == (0, 0)
