"""What a worker's own prefix cache holds, from vLLM's KV events, as routing hints.

vLLM publishes every change of its prefix cache (`--kv-events-config`): blocks stored (with
their token ids, parent block and the extra keys of their hash: LoRA name, cache salt,
multimodal items, prompt-embedding digests), blocks removed, everything cleared. `beluga
worker` turns those events on for every worker, pool or not, and this module turns them
into Beluga block keys (kvpool.keys, the chain the gateway computes) and publishes them as
the worker's hints (engine/hints.py). Evictions are seen, not guessed.

* `LocalCache` follows the events: vLLM's block hash -> our key, bounded (oldest out). A
  block's key is its parent's key chained with its tokens; a chain's first block starts
  from the root of (model fingerprint, cache salt, LoRA adapter). Blocks whose identity our
  keys cannot express (multimodal items, prompt embeddings, an adapter this worker was not
  started with), and blocks whose parent we never saw, get no key (counted).
* `EventSubscriber` reads vLLM's ZMQ stream on a thread of its own, decoding with vLLM's own
  message classes (the pinned release's format); a gap in the sequence numbers is filled
  from vLLM's replay socket, and what cannot be replayed clears the record (it would be
  stale), counted.
* `LocalCacheMiddleware` runs both inside vLLM's API server process (an ASGI middleware
  `beluga worker` passes with `--middleware`), where vLLM's resolved configuration gives
  the model fingerprint exactly as the connector computes it (engine/identity.py), and
  publishes the hints with a HintPublisher.

The events are trusted as much as the vLLM process they come from (the socket lives in a
private folder); still, every field is checked for type and size before use, and a batch
that does not decode is skipped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from kvpool.keys import Adapter, Identity, next_key

logger = logging.getLogger(f"vllm.{__name__}")  # through vLLM's log handlers

BlockHash = int | bytes
MAX_BLOCKS_PER_EVENT = 1 << 16
MIN_CAPACITY = 1 << 17  # blocks followed at least (the hints publish max_hint_keys of them)
MAX_TOKEN_ID = (1 << 32) - 1


# On the API server's /metrics (as the pool lookup endpoint's counters).
SKIPPED = Counter("beluga_worker_hints_skipped_blocks", "Blocks vLLM reported stored that the "
                  "worker's hints cannot list, by reason: multimodal, prompt_embeds, "
                  "adapter_unknown, parent_unknown (their parent was not listed), block_size, "
                  "malformed.", ["reason"])
LOST = Counter("beluga_worker_hints_restarts", "Times the worker's hints record started over "
               "because vLLM's KV events were lost, by why: gap (not replayable), restarted "
               "(a new engine), reader_failed, error.", ["why"])


@dataclass
class CacheCounts:
    """What LocalCache did, for the worker's metrics and logs."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> blocks

    def skip(self, reason: str, blocks: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + blocks
        SKIPPED.labels(reason).inc(blocks)


class LocalCache:
    """vLLM block hash -> Beluga block key for every block the engine's prefix cache holds
    (as far as the events told), most recently stored last; at most `capacity` entries."""

    def __init__(self, fingerprint: bytes, block_tokens: int,
                 adapters: Mapping[str, bytes] | None = None, capacity: int = 1 << 20) -> None:
        self.fingerprint, self.block_tokens = fingerprint, block_tokens
        self.adapters = dict(adapters or {})
        self.capacity = max(1, capacity)
        self.counts = CacheCounts()
        self._keys: OrderedDict[BlockHash, bytes] = OrderedDict()
        self.version = 0  # bumped on every change (the publisher's "anything new?")

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self, limit: int) -> list[bytes]:
        """Up to `limit` keys, the most recently stored last."""
        if limit <= 0:
            return []
        if limit >= len(self._keys):
            return list(self._keys.values())
        out = []
        for i, k in enumerate(reversed(self._keys.values())):
            if i >= limit:
                break
            out.append(k)
        out.reverse()
        return out

    def key_of(self, block_hash: BlockHash) -> bytes | None:
        return self._keys.get(block_hash)

    def stored(self, hashes: Sequence[Any], parent: Any, token_ids: Sequence[Any],
               block_size: Any, lora_name: Any = None, extra_keys: Any = None) -> None:
        """A BlockStored event: `hashes` are consecutive full blocks of `block_size` tokens
        (`token_ids`, all of them), the first one's parent `parent` (None: a prompt's first
        block)."""
        n = len(hashes) if isinstance(hashes, list | tuple) else 0
        if type(block_size) is int and block_size != self.block_tokens:
            self.counts.skip("block_size", n)
            return
        if type(block_size) is not int or not 0 < n <= MAX_BLOCKS_PER_EVENT \
                or not isinstance(token_ids, list | tuple) or len(token_ids) != n * block_size \
                or not all(_is_hash(h) for h in hashes) \
                or (parent is not None and not _is_hash(parent)):
            self.counts.skip("malformed", n)
            return
        if extra_keys is not None and (not isinstance(extra_keys, list | tuple)
                                       or len(extra_keys) != n):
            self.counts.skip("malformed", n)
            return
        adapter: Adapter | None = None
        if lora_name is not None:
            digest = self.adapters.get(lora_name) if isinstance(lora_name, str) else None
            if digest is None:
                self.counts.skip("adapter_unknown", n)
                return
            adapter = Adapter(lora_name, digest)
        prev = None
        if parent is not None:
            prev = self._keys.get(parent)
            if prev is None:
                self.counts.skip("parent_unknown", n)
                return
        for i, block_hash in enumerate(hashes):
            extra = extra_keys[i] if extra_keys is not None else None
            salt, why = _parse_extra(extra, lora_name, first=prev is None)
            if why is not None:
                self.counts.skip(why, n - i)  # and its descendants: their parent is unkeyed
                return
            tokens = token_ids[i * block_size:(i + 1) * block_size]
            if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in tokens):
                self.counts.skip("malformed", n - i)
                return
            if prev is None:
                prev = Identity(self.fingerprint, salt, adapter).root()
            prev = next_key(prev, tokens)
            self._keys[block_hash] = prev
            self._keys.move_to_end(block_hash)
            self.counts.stored += 1
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        self.version += 1

    def removed(self, hashes: Sequence[Any]) -> None:
        if not isinstance(hashes, list | tuple):
            self.counts.skip("malformed")
            return
        for h in hashes:
            if _is_hash(h) and self._keys.pop(h, None) is not None:
                self.counts.removed += 1
        self.version += 1

    def cleared(self) -> None:
        self._keys.clear()
        self.counts.cleared += 1
        self.version += 1


def _is_hash(h: Any) -> bool:
    return (isinstance(h, int) and not isinstance(h, bool) and 0 <= h < (1 << 256)) or (
        isinstance(h, bytes) and 0 < len(h) <= 64)


def _parse_extra(extra: Any, lora_name: Any, first: bool) -> tuple[str, str | None]:
    """The cache salt in a block's published extra keys (vLLM's to_event_extra_keys: the
    LoRA name first when there is one, multimodal items as (identifier, offset) pairs, the
    salt on a prompt's first block, prompt-embedding digests as bytes), and why the block
    cannot be keyed, if it cannot."""
    if extra is None:
        return "", None
    if not isinstance(extra, list | tuple):
        return "", "malformed"
    items = list(extra)
    if lora_name is not None:
        if not items or items[0] != lora_name:
            return "", "malformed"
        items = items[1:]
    salt = ""
    for item in items:
        if isinstance(item, list | tuple):
            return "", "multimodal"
        if isinstance(item, bytes | bytearray):
            return "", "prompt_embeds"
        if isinstance(item, str) and first and not salt and len(item) <= 4096:
            salt = item
            continue
        return "", "malformed"
    return salt, None


# -- the event stream ------------------------------------------------------------------------
@dataclass(frozen=True)
class EventsEndpoint:
    """Where vLLM publishes (PUB, bound by vLLM) and replays (ROUTER) its KV events."""

    publish: str
    replay: str
    topic: str = "beluga"


class EventSubscriber:
    """Reads vLLM's KV event batches on a daemon thread and applies each to `apply` (on that
    thread). Gaps are replayed; what cannot be is reported to `lost`."""

    POLL_MS = 200
    REPLAY_TIMEOUT_MS = 2000

    def __init__(self, endpoint: EventsEndpoint, apply: Callable[[Any], None],
                 lost: Callable[[str], None], idle: Callable[[], None] | None = None) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._zmq = zmq
        self._endpoint = endpoint
        self._apply, self._lost, self._idle = apply, lost, idle
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._decode_error = msgspec.DecodeError
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self.batches = 0
        self.undecodable = 0
        self._last: int | None = None
        self._thread = threading.Thread(target=self._run, name="beluga-kv-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        zmq = self._zmq
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.connect(self._endpoint.publish)
        sub.setsockopt(zmq.SUBSCRIBE, self._endpoint.topic.encode())
        try:
            while not self._stop.is_set():
                if not sub.poll(self.POLL_MS):
                    if self._idle is not None:
                        self._idle()
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.undecodable += 1
                    continue
                seq = int.from_bytes(frames[1], "big")
                if self._last is not None and seq > self._last + 1:
                    self._replay(self._last + 1, seq)
                elif self._last is not None and seq <= self._last:
                    # vLLM restarted its numbering (a new engine process): start over.
                    self._lost("restarted")
                self._handle(frames[2])
                self._last = seq
        except Exception:  # a bug here must not take the API server down: hints stop
            logger.exception("Beluga: reading vLLM's KV events failed; local-cache hints "
                             "stop until the worker restarts")
            self._lost("reader_failed")
        finally:
            sub.close(linger=0)

    def _handle(self, payload: bytes) -> None:
        try:
            batch = self._decoder.decode(payload)
        except self._decode_error:
            self.undecodable += 1
            return
        self.batches += 1
        self._apply(batch)

    def _replay(self, start: int, until: int) -> None:
        """Batches start..until-1 from vLLM's replay buffer; a gap left: lost."""
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        want = start
        try:
            sock.connect(self._endpoint.replay)
            sock.send_multipart([b"", start.to_bytes(8, "big")])
            while sock.poll(self.REPLAY_TIMEOUT_MS):
                frames = sock.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    break
                if frames[2] == b"\xff" * 8:  # END_SEQ
                    break
                seq = int.from_bytes(frames[2], "big")
                if seq != want:
                    break
                if seq < until:
                    self._handle(frames[3])
                    want += 1
        finally:
            sock.close(linger=0)
        if want < until:
            self._lost("gap")


# -- inside vLLM's API server ------------------------------------------------------------------
class HintsFeed:
    """Applies KV event batches to a LocalCache and offers its keys to the publisher at most
    every `interval_s` (and once more when the events stop)."""

    def __init__(self, cache: LocalCache, offer: Callable[[list[bytes]], None],
                 max_keys: int, interval_s: float, clock: Callable[[], float]) -> None:
        self.cache, self._offer, self._max = cache, offer, max_keys
        self._interval, self._clock = interval_s, clock
        self._offered = -1  # the cache version last offered
        self._next = 0.0
        self.lost: dict[str, int] = {}

    def apply(self, batch: Any) -> None:
        try:
            self._apply(batch)
        except Exception:  # a bug: this batch is lost, the record starts over
            logger.exception("Beluga: a KV event batch could not be applied")
            self.on_lost("error")
            return
        self.tick()

    def _apply(self, batch: Any) -> None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        for ev in getattr(batch, "events", ()):
            if getattr(ev, "group_idx", None) not in (None, 0):
                continue  # another KV cache group (hybrid models): not keyed
            if isinstance(ev, BlockStored):
                self.cache.stored(ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                                  ev.block_size, ev.lora_name, ev.extra_keys)
            elif isinstance(ev, BlockRemoved):
                self.cache.removed(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.cache.cleared()

    def on_lost(self, why: str) -> None:
        """Events that cannot be had again: what the record says may be stale. Start over."""
        self.lost[why] = self.lost.get(why, 0) + 1
        LOST.labels(why).inc()
        logger.warning("Beluga: vLLM KV events lost (%s); the local-cache hints start over",
                       why)
        self.cache.cleared()
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        now = self._clock()
        if self.cache.version == self._offered or (now < self._next and not force):
            return
        self._offered = self.cache.version
        self._next = now + self._interval
        self._offer(self.cache.keys(self._max))


class LocalCacheMiddleware:
    """ASGI middleware for vLLM's API server (`--middleware`): on the first request (the
    launcher's first health check), reads vLLM's resolved configuration from the app's
    state, and starts following the KV events and publishing this worker's hints. Passes
    every request through untouched."""

    def __init__(self, app: Any, settings: Any = None) -> None:
        from beluga.settings import Settings

        self.app = app
        self.settings = settings if settings is not None else Settings()
        self.feed: HintsFeed | None = None
        self._subscriber: EventSubscriber | None = None
        self._publisher: Any = None
        self._started = False
        self._pool_tried = 0.0
        self._fingerprint = b""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "lifespan":
            async def receiving() -> Any:
                message = await receive()
                if message.get("type") == "lifespan.shutdown":
                    await asyncio.to_thread(self.close)
                return message

            await self.app(scope, receiving, send)
            return
        if not self._started and scope.get("type") == "http":
            state = getattr(scope.get("app"), "state", None)
            config = getattr(state, "vllm_config", None)
            if config is not None:
                self._started = True
                try:  # (reads the adapters' files and the pool's header: off the loop)
                    await asyncio.to_thread(self.start, config)
                except Exception:  # hints are an optimisation: serve without them
                    logger.exception("Beluga: local-cache hints not started")
        await self.app(scope, receive, send)

    def start(self, vllm_config: Any) -> None:
        from engine.hints import HintPublisher
        from engine.identity import model_identity
        from kvpool.keys import adapter_digest

        s = self.settings
        endpoints = s.kv_events_endpoints
        if endpoints is None:
            logger.warning("Beluga: no KV events endpoint (kv_events_dir): no local-cache "
                           "hints from this worker")
            return
        identity = model_identity(vllm_config)
        adapters = {}
        for name, folder in s.lora_adapters.items():
            try:
                adapters[name] = adapter_digest(folder)
            except (OSError, ValueError) as exc:  # e.g. a Hub id: vLLM downloads it
                logger.warning("Beluga: LoRA adapter %s (%s) cannot be keyed: not in this "
                               "worker's hints, its prompts routed without prefix "
                               "information: %s", name, folder, exc)
        # Every block the engine may hold, with room: a parent dropped here while vLLM
        # still holds it would leave its descendants without keys (~150 bytes an entry).
        cache = LocalCache(identity.fingerprint(), identity.block_tokens, adapters,
                           capacity=max(s.max_hint_keys, 4 * _num_blocks(vllm_config),
                                        MIN_CAPACITY))
        # The pool (the engine created it before the server started) goes into the first
        # record, so gateways route to what the pool holds from the first request on.
        self._fingerprint = identity.fingerprint()
        pool = self._pool_identity()
        self._publisher = HintPublisher(
            s.redis_url, s.redis_key_prefix, s.resolved_worker_id, identity.fingerprint(),
            identity.block_tokens, pool[0] if pool else None, s.hints_ttl_s,
            s.hints_interval_s, s.max_hint_keys, pool_path=pool[1] if pool else None,
            adapters=adapters)
        self.feed = HintsFeed(cache, self._offer, s.max_hint_keys, s.hints_interval_s,
                              time.monotonic)
        publish, replay = endpoints
        self._subscriber = EventSubscriber(EventsEndpoint(publish, replay), self.feed.apply,
                                           self.feed.on_lost, self.feed.tick)
        logger.info("Beluga: local-cache hints from vLLM's KV events (%s), %d-token blocks%s",
                    publish, identity.block_tokens,
                    f", adapters {sorted(adapters)}" if adapters else "")

    def close(self) -> None:
        """At the server's shutdown: stop reading, and take this worker's hints out of Redis
        (else they would be routed on until their TTL ends)."""
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def _offer(self, keys: list[bytes]) -> None:
        publisher = self._publisher
        if publisher is None:  # closed
            return
        self._attach_pool()
        publisher.offer(keys)

    def _attach_pool(self) -> None:
        """A pool not there at start (created late): its UUID for the record, once it is."""
        if self._pool_tried < 0 or time.monotonic() - self._pool_tried < 5.0:
            return
        self._pool_tried = time.monotonic()
        pool = self._pool_identity()
        if pool is not None and self._publisher is not None:
            self._publisher.set_pool(*pool)

    def _pool_identity(self) -> tuple[str, str] | None:
        """(UUID, path) of this worker's pool, read by attaching it without prefaulting;
        None without a pool, while it cannot be attached, or when it is another model's
        (the connector then serves without it)."""
        from kvpool import KVPool, PoolError

        s = self.settings
        if not s.pool:
            self._pool_tried = -1.0  # nothing to look for
            return None
        try:
            pool = KVPool.attach(s.resolved_pool_path, prefault=False,
                                 fingerprint=self._fingerprint)
        except (PoolError, OSError) as exc:
            logger.debug("Beluga: pool not attached for the hints record yet: %s", exc)
            return None
        try:
            self._pool_tried = -1.0  # found
            return str(pool.uuid), str(pool.path)
        finally:
            pool.close()


def _num_blocks(vllm_config: Any) -> int:
    n = getattr(vllm_config.cache_config, "num_gpu_blocks", None)
    return int(n) if isinstance(n, int) and n > 0 else 0
