"""engine/local_cache.py: vLLM's KV events -> Beluga block keys -> the worker's hints.

The LocalCache tests feed events as vLLM's block pool emits them; the stream tests run
vLLM's own ZmqEventPublisher (the pinned release's wire format) against our subscriber."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.local_cache import EventsEndpoint, EventSubscriber, HintsFeed, LocalCache
from kvpool import ModelIdentity, block_keys
from kvpool.keys import Adapter

FP = ModelIdentity("m", "r", "float32", 30, 3, 64, 4).fingerprint()
BT = 4


def stored(cache: LocalCache, hashes: list[Any], parent: Any, tokens: list[int],
           lora: str | None = None, extra: Any = None, block_size: int = BT) -> None:
    cache.stored(hashes, parent, tokens, block_size, lora, extra)


def test_chained_events_give_the_keys_the_gateway_computes() -> None:
    cache = LocalCache(FP, BT)
    tokens = list(range(100, 124))  # six blocks, stored as vLLM does: in steps
    stored(cache, [11, 12], None, tokens[:8])
    stored(cache, [13], 12, tokens[8:12])
    stored(cache, [14, 15, 16], 13, tokens[12:24])
    assert cache.keys(100) == block_keys(tokens, BT, FP)
    assert [cache.key_of(h) for h in (11, 16)] == [block_keys(tokens, BT, FP)[i] for i in (0, 5)]
    assert cache.counts.stored == 6 and not cache.counts.skipped


def test_a_salted_prompt_and_an_adapter_key_as_their_chains_do() -> None:
    digest = b"\x07" * 32
    cache = LocalCache(FP, BT, adapters={"sql": digest})
    tokens = list(range(8))
    stored(cache, [b"a" * 32, b"b" * 32], None, tokens, extra=[("tenant",), None])
    assert cache.keys(2) == block_keys(tokens, BT, FP, cache_salt="tenant")
    stored(cache, [21, 22], None, tokens, lora="sql", extra=[("sql", "t2"), ("sql",)])
    want = block_keys(tokens, BT, FP, cache_salt="t2", adapter=Adapter("sql", digest))
    assert [cache.key_of(21), cache.key_of(22)] == want
    stored(cache, [31], None, tokens[:4], lora="other", extra=[("other",)])
    assert cache.key_of(31) is None and cache.counts.skipped == {"adapter_unknown": 1}


@pytest.mark.parametrize(("extra", "why"), [
    ([("img-1", 0)], "multimodal"), ([(b"\x01" * 32,)], "prompt_embeds"),
    ([("salt", "second-string")], "malformed"), (["not-a-tuple"], "malformed")])
def test_blocks_our_keys_cannot_express_get_none_nor_do_their_descendants(
        extra: list[Any], why: str) -> None:
    from prometheus_client import REGISTRY

    def exported(reason: str) -> float:
        return REGISTRY.get_sample_value("beluga_worker_hints_skipped_blocks_total",
                                         {"reason": reason}) or 0.0

    before = exported(why)
    cache = LocalCache(FP, BT)
    tokens = list(range(8))
    extra_keys = [(("img-1", 0),) if why == "multimodal" else e for e in extra] + [None]
    stored(cache, [1, 2], None, tokens, extra=extra_keys)
    stored(cache, [3], 2, list(range(8, 12)))
    assert len(cache) == 0
    assert cache.counts.skipped == {why: 2, "parent_unknown": 1}
    assert exported(why) - before == 2  # on the worker's /metrics


def test_removed_and_cleared_blocks_leave_the_record() -> None:
    cache = LocalCache(FP, BT)
    stored(cache, [1, 2, 3], None, list(range(12)))
    cache.removed([2, 99])
    assert cache.key_of(2) is None and len(cache) == 2 and cache.counts.removed == 1
    cache.cleared()
    assert len(cache) == 0 and cache.keys(10) == []


def test_the_record_is_bounded_and_keeps_the_newest() -> None:
    cache = LocalCache(FP, BT, capacity=3)
    for i in range(10):
        stored(cache, [i], None, [i] * 4)
    assert len(cache) == 3 and cache.keys(2) == [cache.key_of(8), cache.key_of(9)]


@pytest.mark.parametrize("event", [
    ([1], None, [1, 2, 3], BT),                      # too few tokens
    ([1], None, [1, 2, 3, 4], 8),                    # another block size
    ([1], None, [1, 2, 3, -4], BT),                  # not a token id
    ([1], None, [1, 2, 3, 2**32], BT),
    ([1], None, [1, 2, 3, "x"], BT),
    ([1], None, [1, 2, 3, True], BT),
    ([1], None, [1, 2, 3, 4], 4.0),
    (["h"], None, [1, 2, 3, 4], BT),                 # not a hash
    ([True], None, [1, 2, 3, 4], BT),
    ([1], 1.5, [1, 2, 3, 4], BT),
    ([], None, [], BT),
    ("12", None, [1, 2, 3, 4], BT),
    ([1] * 70_000, None, [0] * 280_000, BT),         # more blocks than an event has
])
def test_malformed_events_are_counted_never_raised(event: tuple[Any, ...]) -> None:
    cache = LocalCache(FP, BT)
    hashes, parent, tokens, size = event
    cache.stored(hashes, parent, tokens, size, None, None)
    cache.stored([5], None, [1, 2, 3, 4], BT, None, [None, None])  # extra_keys per block
    cache.removed("not-a-list")
    assert len(cache) == 0 and sum(cache.counts.skipped.values()) >= 2


# --- the stream: vLLM's publisher, our subscriber --------------------------------------------

@pytest.fixture
def events(tmp_path: Path) -> Iterator[tuple[Any, EventsEndpoint]]:
    from vllm.distributed.kv_events import ZmqEventPublisher

    ep = EventsEndpoint(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay", "beluga")
    pub = ZmqEventPublisher(0, endpoint=ep.publish, replay_endpoint=ep.replay, topic=ep.topic)
    try:
        yield pub, ep
    finally:
        pub.shutdown()


def batch(*events: Any) -> Any:
    from vllm.distributed.kv_events import KVEventBatch

    return KVEventBatch(ts=time.time(), events=list(events))


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_vllms_publisher_feeds_the_hints(events: tuple[Any, EventsEndpoint]) -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    pub, ep = events
    offered: list[list[bytes]] = []
    feed = HintsFeed(LocalCache(FP, BT), offered.append, max_keys=100, interval_s=0.0,
                     clock=time.monotonic)
    sub = EventSubscriber(ep, feed.apply, feed.on_lost, feed.tick)
    try:
        tokens = list(range(500, 512))
        store = BlockStored(block_hashes=[1, 2, 3], parent_block_hash=None, token_ids=tokens,
                            block_size=BT, lora_id=None, medium="GPU", lora_name=None)
        # PUB/SUB: the first batches may go before the subscription is through; vLLM's
        # first events come after the server is up, long after. Publish until one lands.
        deadline = time.monotonic() + 10
        while not offered and time.monotonic() < deadline:
            pub.publish(batch(store))
            time.sleep(0.05)
        wait_for(lambda: offered and offered[-1] == block_keys(tokens, BT, FP))
        pub.publish(batch(BlockRemoved(block_hashes=[3], medium="GPU")))
        wait_for(lambda: offered[-1] == block_keys(tokens, BT, FP)[:2])
        pub.publish(batch(AllBlocksCleared()))
        wait_for(lambda: offered[-1] == [])
        assert sub.undecodable == 0 and not feed.lost
    finally:
        sub.close()


def test_a_gap_in_the_stream_is_replayed(events: tuple[Any, EventsEndpoint]) -> None:
    """Batches published while the subscriber was away come back from vLLM's replay
    socket when the next one shows the gap."""
    from vllm.distributed.kv_events import BlockStored

    pub, ep = events
    seen: list[Any] = []
    lost: list[str] = []
    sub = EventSubscriber(ep, seen.append, lost.append)
    try:
        def store(h: int) -> Any:
            return batch(BlockStored(block_hashes=[h], parent_block_hash=None,
                                     token_ids=[h] * BT, block_size=BT, lora_id=None,
                                     medium="GPU", lora_name=None))

        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            pub.publish(store(0))
            time.sleep(0.05)
        wait_for(lambda: bool(seen))
        for h in range(2, 6):
            pub.publish(store(h))
        wait_for(lambda: len(seen) >= 5)
        time.sleep(0.3)  # every one of those landed
        before = len(seen)
        assert sub._last is not None and sub._last >= 4
        sub._last -= 3  # as if three batches had been missed
        pub.publish(store(1))
        wait_for(lambda: len(seen) >= before + 4)
        assert not lost
    finally:
        sub.close()


def test_the_feed_offers_at_most_once_an_interval_and_starts_over_after_a_loss() -> None:
    now = [0.0]
    offered: list[list[bytes]] = []
    cache = LocalCache(FP, BT)
    feed = HintsFeed(cache, offered.append, max_keys=2, interval_s=1.0, clock=lambda: now[0])
    stored(cache, [1, 2, 3], None, list(range(12)))
    feed.tick()
    assert offered == [block_keys(list(range(12)), BT, FP)[1:]]  # the newest max_keys
    cache.removed([3])
    feed.tick()  # within the interval: held back
    assert len(offered) == 1
    now[0] = 1.5
    feed.tick()
    assert len(offered) == 2 and len(offered[-1]) == 2
    feed.tick()  # nothing new: nothing offered
    assert len(offered) == 2
    feed.on_lost("gap")  # what the record says may be stale: empty, at once
    assert offered[-1] == [] and len(cache) == 0 and feed.lost == {"gap": 1}
