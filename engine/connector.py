"""BelugaConnector: vLLM workers share KV blocks through the Beluga pool.

Selected with vLLM's --kv-transfer-config (`beluga worker` does it, see engine/worker.py):

    {"kv_connector": "BelugaConnector", "kv_connector_module_path": "engine.connector",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"pool_path": ..., ...}}   # ConnectorConfig below

Scheduler side (EngineCore process): for each new request, one batched pin of the request's
block keys beyond its local prefix-cache hit tells vLLM how many tokens the pool can supply;
the pinned slots are the promise, released when the worker reports the step that loaded
them. Each step's plan names the loads (slot -> engine block) and the saves (every full block
whose KV this step completes, keyed by DESIGN.md's block keys). Routing hints are not the
connector's: every worker publishes them from vLLM's KV events (engine/local_cache.py).

Worker side (model runner process): registers the paged KV tensors as copy segments, then
per step scatters the planned loads before the forward pass (one native call, verified
against each block's checksum; a failed block is reported so vLLM recomputes it) and
gathers the new full blocks after it (one native call; first writer of a key wins).

If the pool is missing, mismatched or unusable, the connector says so once in the log, the
worker serves without sharing, and `beluga_worker_pool_enabled` is 0.

A pool call that fails later (kvpool.PoolError: a lock held past `lock_timeout_s` by a busy
or frozen peer, a corrupt value, ...) never reaches vLLM: the request or step goes on without
the pool (no tokens matched, blocks recomputed, a save skipped), the failure is counted by
kind (`beluga_worker_pool_errors_total{kind}`) and logged once per kind a minute. After a
busy lock, pins and saves are skipped for `busy_backoff_s`, so a frozen peer costs the
engine one lock timeout per backoff rather than one per request and step. An exception that
is not a PoolError is a bug and propagates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from beluga.pool_errors import BusyBackoff, PoolErrorLog
from beluga.stacks import dump_stacks_on_sigusr1
from engine.connector_meta import (
    BelugaMetadata,
    BelugaWorkerMeta,
    LoadSpec,
    SaveSpec,
    StepPlan,
)
from engine.connector_metrics import BelugaPromMetrics, BelugaStats
from engine.identity import model_identity
from engine.kv_layout import BlockLayout, LayoutError, block_layout
from kvpool import (
    KVPool,
    ModelIdentity,
    Outcome,
    PoolError,
    PoolFingerprintError,
    PoolFormatError,
    PoolGeometryError,
)
from kvpool.keys import Adapter, Identity, KeyChain, adapter_digest, adapter_signature

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(f"vllm.{__name__}")  # through vLLM's log handlers
GiB = 1 << 30


class ConnectorConfig(BaseModel):
    """kv_connector_extra_config, validated (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool_path: Path
    pool_size_gib: float = Field(4.0, gt=0)
    coherence: Literal["none", "flush"] = "none"
    worker_id: str = "worker"
    copy_threads: int = Field(0, ge=0)  # 0: torch's thread count
    # How long a pool call waits for the lock while a live process holds it (a critical
    # section takes microseconds: longer means a peer is stuck), then PoolBusyError and the
    # request or step goes on without the pool. Also what the engine loses per busy call.
    lock_timeout_s: float = Field(0.5, gt=0, le=60)
    # After a busy lock, pins and saves are skipped this long (0: never skipped).
    busy_backoff_s: float = Field(2.0, ge=0, le=3600)


@dataclass(frozen=True)
class PoolGeometry:
    identity: ModelIdentity
    block_tokens: int
    slot_size: int
    layer_names: tuple[str, ...]

    @property
    def fingerprint(self) -> bytes:
        return self.identity.fingerprint()


def pool_geometry(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig,
                  tp_rank: int = 0) -> PoolGeometry:
    """Identity and slot size from the model config and the KV cache spec. Raises
    LayoutError for configurations the pool does not share (several KV cache groups)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise LayoutError(f"{len(groups)} KV cache groups (hybrid models are not shared yet)")
    spec = groups[0].kv_cache_spec
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise LayoutError("pipeline parallelism is not shared yet")
    identity = model_identity(vllm_config, tp_rank)
    # The identity is made from the configuration alone (the local-cache hints have no KV
    # cache spec); the spec must say the same, or the keys would not describe the blocks.
    if (len(groups[0].layer_names), spec.block_size) != (identity.num_layers,
                                                         identity.block_tokens):
        raise LayoutError(f"the KV cache has {len(groups[0].layer_names)} layers of "
                          f"{spec.block_size}-token blocks; the model config says "
                          f"{identity.num_layers} of {identity.block_tokens}")
    return PoolGeometry(identity, spec.block_size,
                        spec.page_size_bytes * len(groups[0].layer_names),
                        tuple(groups[0].layer_names))


def open_pool(cfg: ConnectorConfig, geo: PoolGeometry, side: str) -> KVPool:
    slots = max(1, int(cfg.pool_size_gib * GiB) // geo.slot_size)
    pool = KVPool.open(cfg.pool_path, slot_size=geo.slot_size, slot_count=slots,
                       fingerprint=geo.fingerprint, coherence=cfg.coherence,
                       lock_timeout_s=cfg.lock_timeout_s)
    logger.info("Beluga pool %s attached (%s): %d slots of %d bytes, uuid %s", pool.path,
                side, pool.slot_count, pool.slot_size, pool.uuid)
    return pool


class BelugaConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role,
                         kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        if kv_cache_config is None:
            raise ValueError("BelugaConnector needs the KV cache config (vLLM >= 0.11)")
        try:
            cfg = ConnectorConfig.model_validate(
                self._kv_transfer_config.kv_connector_extra_config or {})
        except ValidationError as exc:
            raise ValueError(f"BelugaConnector: bad kv_connector_extra_config: {exc}") from None
        self._sched: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        dump_stacks_on_sigusr1()
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _SchedulerSide(cfg, vllm_config, kv_cache_config)
        else:
            self._worker = _WorkerSide(cfg, vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are complete before the forward pass starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # saved all layers at once in wait_for_save: one native call per step

    def wait_for_save(self) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            self._worker.save(self._plan())

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> BelugaWorkerMeta | None:
        assert self._worker is not None
        return self._worker.take_done_steps()

    def shutdown(self) -> None:
        for side in (self._worker, self._sched):
            if side is not None:
                side.close()

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        return self._sched.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._sched is not None
        self._sched.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._sched is not None
        return BelugaMetadata(self._sched.plan_step(scheduler_output))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._sched is not None
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, BelugaWorkerMeta):
            self._sched.steps_done(meta.steps(), meta.bad())

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        self._sched.finished(request.request_id)
        return False, None

    # -- both ----------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self._worker if self._worker is not None else self._sched
        return side.stats.take() if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return BelugaStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig,
                           metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return BelugaPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _plan(self) -> StepPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        if not isinstance(meta, BelugaMetadata):
            raise TypeError(f"BelugaConnector got {type(meta).__name__} metadata")
        return meta.plan()


# ----------------------------------------------------------------------------------------
# scheduler side
# ----------------------------------------------------------------------------------------
@dataclass
class _Tracked:
    request: Request
    block_ids: list[int] = field(default_factory=list)
    chain: KeyChain | None = None  # its block keys, extended as its tokens are computed
    unshared: bool = False  # keys cannot express its identity: it never touches the pool
    saved_blocks: int = 0  # leading blocks already handed to the worker to save


@dataclass
class _Promise:
    start_block: int   # first block to load (the local hit ends here)
    slots: list[int]   # pinned pool slots for blocks start_block, start_block + 1, ...
    keys: list[bytes]  # their keys
    req_id: str = ""


class _SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, vllm_config: VllmConfig,
                 kv_cache_config: KVCacheConfig) -> None:
        self.cfg = cfg
        self.stats = BelugaStats()
        self.pool: KVPool | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._promised: dict[str, _Promise] = {}   # pinned, not yet in a step plan
        self._local_hit: dict[str, int] = {}       # tokens vLLM had locally, per request
        self._planned: dict[str, _Promise] = {}    # allocated, goes into the next plan
        self._in_flight: dict[int, list[_Promise]] = {}  # step -> its loads (pinned)
        self._step = 0
        # (name, path) -> (its files' signature, Adapter), as first met
        self._adapters: dict[tuple[str, str], tuple[Any, Adapter]] = {}
        self._adapter_warned: set[tuple[str, str]] = set()
        self.errors = PoolErrorLog(logger, "Beluga (scheduler)", self.stats.pool_error)
        self.backoff = BusyBackoff(cfg.busy_backoff_s)
        try:
            self.geo = pool_geometry(vllm_config, kv_cache_config)
            self.block_tokens = self.geo.block_tokens
            self.pool = open_pool(cfg, self.geo, "scheduler")
        except (PoolError, LayoutError, OSError) as exc:
            hint = ""
            if isinstance(exc, PoolGeometryError | PoolFingerprintError | PoolFormatError):
                hint = (f" ({cfg.pool_path} belongs to another model or version: delete it "
                        "or pass another --pool-path)")
            logger.warning("Beluga pool unavailable, serving WITHOUT KV sharing: %s%s",
                           exc, hint)
            self.block_tokens = vllm_config.cache_config.block_size
        self.stats.set_enabled(self.pool is not None)

    def _track(self, request: Request) -> _Tracked:
        t = self._tracked.get(request.request_id)
        if t is None or t.request is not request:
            t = self._tracked[request.request_id] = _Tracked(request)
        return t

    def _keys(self, t: _Tracked, upto_tokens: int) -> list[bytes]:
        """Block keys of the request's full blocks within its first `upto_tokens` tokens;
        none for a request whose identity they cannot express (it never touches the pool)."""
        if t.chain is None:
            if t.unshared:
                return []
            identity = self._identity(t.request)
            if identity is None:
                t.unshared = True
                self.stats.add("unshared_requests", 1)
                return []
            t.chain = KeyChain.of(identity, self.block_tokens)
        return t.chain.advance(t.request.all_token_ids, upto_tokens)

    def _identity(self, request: Request) -> Identity | None:
        """What besides its tokens decides the request's KV, as block keys express it: the
        model, the cache salt and the LoRA adapter (by name and by the digest of its files,
        kvpool.keys.adapter_digest). None for what they cannot express: multimodal inputs
        and prompt embeddings, or an adapter whose files cannot be read."""
        if request.mm_features or getattr(request, "prompt_embeds", None) is not None:
            return None
        adapter = None
        lora = request.lora_request
        if lora is not None:
            adapter = self._adapter(lora.lora_name, lora.lora_path)
            if adapter is None:
                return None
        return Identity(self.geo.fingerprint, request.cache_salt or "", adapter)

    def _adapter(self, name: str, path: str) -> Adapter | None:
        """The adapter as keys see it, digested the first time it is met (when vLLM loads
        it): the weights the engine runs. If its files change afterwards, what the engine
        computes and what a digest of the files says may differ (vLLM may or may not have
        reloaded them): from then on its requests do not use the pool."""
        key = (name, path)
        try:
            now = adapter_signature(path)
            known = self._adapters.get(key)
            if known is None:
                known = self._adapters[key] = (now, Adapter(name, adapter_digest(path)))
            if known[0] == now:
                return known[1]
            why = "changed on disk since it was loaded"
        except (OSError, ValueError) as exc:
            why = f"cannot be keyed ({exc})"
        if key not in self._adapter_warned:
            self._adapter_warned.add(key)
            logger.warning("Beluga: LoRA adapter %s (%s) %s; its requests do not use the pool",
                           name, path, why)
        return None

    def _failed(self, exc: PoolError, doing: str) -> None:
        self.errors.report(exc, doing)
        self.backoff.note(exc)

    def _unpin(self, slots: list[int]) -> None:
        if not slots or self.pool is None:
            return
        try:
            self.pool.unpin(slots)
        except PoolError as exc:  # the pins go at the next rebuild, detach or exit
            self._failed(exc, f"unpinning {len(slots)} slots")

    def _release(self, promise: _Promise | None) -> None:
        if promise is not None:
            self._unpin(promise.slots)

    def matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        if self.pool is None:
            return 0
        self._release(self._promised.pop(request.request_id, None))  # asked again
        self._local_hit[request.request_id] = num_computed_tokens
        t = self._track(request)
        keys = self._keys(t, request.num_tokens)
        start = num_computed_tokens // self.block_tokens
        if len(keys) <= start or self.backoff.active():
            return 0
        try:
            slots = self.pool.pin(keys[start:])
        except PoolError as exc:
            self._failed(exc, "pinning a prompt's blocks (computing them instead)")
            return 0
        # Whole blocks only, and never the block holding the last prompt token: vLLM computes
        # that one itself, exactly as after a hit in its own prefix cache. So a pool hit
        # leaves the engine in the state a local hit would, computation split included.
        last_full = (request.num_tokens - 1) // self.block_tokens
        end_tokens = min(start + len(slots), last_full) * self.block_tokens
        external = end_tokens - num_computed_tokens
        if external <= 0:
            self._unpin(slots)
            return 0
        need = end_tokens // self.block_tokens - start
        if need < len(slots):
            self._unpin(slots[need:])
            slots = slots[:need]
        self._promised[request.request_id] = _Promise(start, slots, keys[start:start + need],
                                                      request.request_id)
        return external

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        promise = self._promised.pop(request.request_id, None)
        local = self._local_hit.pop(request.request_id, 0)
        self._track(request)
        if num_external_tokens == 0 or promise is None:
            self._release(promise)
            self._count_prompt(request, local, 0)
            return
        self._planned[request.request_id] = promise
        self._count_prompt(request, local, num_external_tokens)

    def _count_prompt(self, request: Request, local: int, pool: int) -> None:
        if self.pool is None:
            return
        prompt = len(request.prompt_token_ids or ())
        self.stats.add("local_tokens", min(local, prompt))
        self.stats.add("pool_tokens", pool)
        self.stats.add("computed_tokens", max(0, prompt - local - pool))

    def plan_step(self, out: SchedulerOutput) -> StepPlan:
        self._step += 1
        if self.pool is None:
            return StepPlan(self._step)
        for new in out.scheduled_new_reqs:
            t = self._tracked.get(new.req_id)
            if t is not None:
                t.block_ids = list(new.block_ids[0])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            t = self._tracked.get(req_id)
            added = cached.new_block_ids[i]
            if t is None or added is None:
                continue
            if req_id in cached.resumed_req_ids:
                t.block_ids = list(added[0])
            else:
                t.block_ids.extend(added[0])
        loads = []
        in_flight: list[_Promise] = []
        for req_id, promise in self._planned.items():
            t = self._tracked[req_id]
            ids = t.block_ids[promise.start_block:promise.start_block + len(promise.slots)]
            if len(ids) != len(promise.slots):  # cannot happen: vLLM allocated them
                logger.error("Beluga: %s has %d blocks for %d planned loads; not loading",
                             req_id, len(ids), len(promise.slots))
                self._release(promise)
                continue
            loads.append(LoadSpec(req_id, tuple(promise.slots), tuple(ids),
                                  tuple(promise.keys)))
            in_flight.append(promise)
        self._planned.clear()
        if in_flight:
            self._in_flight[self._step] = in_flight
        saves = []
        for req_id, n_sched in out.num_scheduled_tokens.items():
            t = self._tracked.get(req_id)
            if t is None:
                continue
            done = t.request.num_computed_tokens + n_sched  # KV complete after this step
            keys = self._keys(t, min(done, len(t.request.all_token_ids)))
            if len(keys) > t.saved_blocks and len(t.block_ids) >= len(keys):
                todo = range(t.saved_blocks, len(keys))
                saves.append(SaveSpec(req_id, tuple(keys[i] for i in todo),
                                      tuple(t.block_ids[i] for i in todo)))
                t.saved_blocks = len(keys)
        return StepPlan(self._step, tuple(loads), tuple(saves))

    def steps_done(self, steps: set[int], bad_slots: set[int]) -> None:
        """The worker finished these steps' loads: unpin. Blocks that failed validation
        leave the pool, and their requests save them again once recomputed."""
        for step in steps:
            for promise in self._in_flight.pop(step, []):
                self._release(promise)
                bad = [i for i, s in enumerate(promise.slots) if s in bad_slots]
                if not bad or self.pool is None:
                    continue
                self._remove([promise.keys[i] for i in bad])
                t = self._tracked.get(promise.req_id)
                if t is not None:
                    t.saved_blocks = min(t.saved_blocks, promise.start_block + bad[0])

    def _remove(self, keys: list[bytes]) -> None:
        """Drop blocks that failed validation (best effort: a reader that meets one again
        verifies it again, and removes it)."""
        for key in keys:
            if self.pool is None or self.backoff.active():
                return
            try:
                self.pool.remove(key)
            except PoolError as exc:
                self._failed(exc, "removing a block that failed validation")
                return

    def finished(self, req_id: str) -> None:
        self._local_hit.pop(req_id, None)
        self._release(self._promised.pop(req_id, None))
        self._release(self._planned.pop(req_id, None))
        self._tracked.pop(req_id, None)

    def close(self) -> None:
        _close(self.pool, self.errors)
        self.pool = None


def _close(pool: KVPool | None, errors: PoolErrorLog) -> None:
    if pool is None:
        return
    try:
        pool.close()
    except PoolError as exc:  # (detach does not raise; a pool error must not stop shutdown)
        errors.report(exc, "detaching")


# ----------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------
class _WorkerSide:
    def __init__(self, cfg: ConnectorConfig, vllm_config: VllmConfig,
                 kv_cache_config: KVCacheConfig) -> None:
        self.cfg = cfg
        self.stats = BelugaStats()
        self.pool: KVPool | None = None
        self.layout: BlockLayout | None = None
        self._kv_cache_config = kv_cache_config
        self._load_errors: set[int] = set()
        self._done: set[int] = set()
        self._bad_slots: set[int] = set()
        self._threads = cfg.copy_threads or torch.get_num_threads()
        self.errors = PoolErrorLog(logger, "Beluga (model runner)", self.stats.pool_error)
        self.backoff = BusyBackoff(cfg.busy_backoff_s)
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
            self.geo: PoolGeometry | None = pool_geometry(
                vllm_config, kv_cache_config, get_tensor_model_parallel_rank())
            if vllm_config.parallel_config.tensor_parallel_size != 1:
                raise LayoutError("tensor parallelism is not shared yet")
            self.pool = open_pool(cfg, self.geo, "worker")
        except (PoolError, LayoutError, OSError) as exc:
            # The scheduler side meets the same condition and warns once for the worker.
            logger.info("Beluga pool unavailable in the model runner: %s", exc)
            self.geo = None
        self.stats.set_enabled(self.pool is not None)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.pool is None or self.geo is None:
            return
        try:
            layout = block_layout(kv_caches, self.geo.layer_names,
                                  self._kv_cache_config.num_blocks)
            if layout.block_bytes != self.pool.slot_size:
                raise LayoutError(f"a block holds {layout.block_bytes} bytes, the pool's "
                                  f"slots {self.pool.slot_size}")
            if layout.device.type != "cpu":
                self.pool.cuda_register()
        except (LayoutError, PoolError) as exc:
            if isinstance(exc, PoolError):
                self.errors.report(exc, "registering the KV cache")
            logger.warning("Beluga: cannot copy this KV cache layout, serving WITHOUT KV "
                           "sharing: %s", exc)
            _close(self.pool, self.errors)
            self.pool = None
            self.stats.set_enabled(False)
            return
        self.layout = layout
        logger.info("Beluga: %d KV segments per block, %d bytes per block on %s",
                    len(layout.segments), layout.block_bytes, layout.device)

    def load(self, plan: StepPlan | None) -> None:
        if plan is None or not plan.loads:
            return
        slots = [s for x in plan.loads for s in x.slots]
        blocks = [b for x in plan.loads for b in x.block_ids]
        keys = [k for x in plan.loads for k in x.keys]
        self._done.add(plan.step)
        if self.pool is None or self.layout is None:
            # The scheduler promised blocks this worker cannot copy: recompute them all.
            self._load_errors.update(blocks)
            self.stats.add("load_errors", len(blocks))
            return
        t0 = time.perf_counter()
        try:
            if self.layout.device.type == "cpu":
                failed = self.pool.scatter(slots, blocks, self.layout.segments, self._threads,
                                           keys=keys)
            else:
                failed = self.pool.scatter_cuda(
                    slots, blocks, self.layout.segments, self.layout.device.index or 0,
                    torch.cuda.current_stream().cuda_stream, self._threads, keys=keys)
        except PoolError as exc:
            # Not the blocks' fault (they stay in the pool): all of them are recomputed.
            self.errors.report(exc, f"loading {len(blocks)} blocks (recomputing them)")
            self._load_errors.update(blocks)
            self.stats.add("load_errors", len(blocks))
            return
        dt = time.perf_counter() - t0
        if failed:
            logger.warning("Beluga: %d of %d loaded blocks failed validation; vLLM "
                           "recomputes them", len(failed), len(blocks))
            self._load_errors.update(blocks[i] for i in failed)
            self._bad_slots.update(slots[i] for i in failed)
            self.stats.add("load_errors", len(failed))
        ok = len(blocks) - len(failed)
        self.stats.add("blocks_loaded", ok)
        self.stats.add("load_bytes", ok * self.layout.block_bytes)
        self.stats.add("load_seconds", dt)

    def save(self, plan: StepPlan | None) -> None:
        if plan is None or not plan.saves or self.pool is None or self.layout is None:
            return
        keys = [k for x in plan.saves for k in x.keys]
        blocks = [b for x in plan.saves for b in x.block_ids]
        if self.backoff.active():  # the lock was busy a moment ago: not waiting again
            self.stats.add("save_errors", len(keys))
            return
        t0 = time.perf_counter()
        try:
            slots = self.pool.prepare_store(keys)
        except PoolError as exc:
            self._failed(exc, f"reserving slots for {len(keys)} blocks (not saving them)")
            self.stats.add("save_errors", len(keys))
            return
        mine = [i for i, r in enumerate(slots) if r.reserved]
        self.stats.add("save_errors", sum(1 for r in slots if r.outcome is Outcome.FULL))
        if not mine:
            return
        sel_slots = [slots[i].slot for i in mine]
        sel_blocks = [blocks[i] for i in mine]
        try:
            if self.layout.device.type == "cpu":
                sums = self.pool.gather(sel_slots, sel_blocks, self.layout.segments,
                                        self._threads)
            else:
                sums = self.pool.gather_cuda(
                    sel_slots, sel_blocks, self.layout.segments, self.layout.device.index or 0,
                    torch.cuda.current_stream().cuda_stream, self._threads)
            self.pool.complete_store(sel_slots, [self.layout.block_bytes] * len(mine),
                                     checksums=sums)
        except BaseException as exc:
            # Abort every reserved slot (none may stay WRITING); where the lock is busy the
            # native side frees them at its next lock. A failing abort must not hide `exc`.
            try:
                self.pool.complete_store(sel_slots, ok=False)
            except PoolError as abort_exc:
                self._failed(abort_exc, f"aborting the save of {len(mine)} blocks")
            if not isinstance(exc, PoolError):
                raise
            self._failed(exc, f"saving {len(mine)} blocks (not saved)")
            self.stats.add("save_errors", len(mine))
            return
        self.stats.add("blocks_saved", len(mine))
        self.stats.add("save_bytes", len(mine) * self.layout.block_bytes)
        self.stats.add("save_seconds", time.perf_counter() - t0)

    def _failed(self, exc: PoolError, doing: str) -> None:
        self.errors.report(exc, doing)
        self.backoff.note(exc)

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def take_done_steps(self) -> BelugaWorkerMeta | None:
        if not self._done:
            return None
        out = BelugaWorkerMeta(self._done, self._bad_slots)
        self._done, self._bad_slots = set(), set()
        return out

    def close(self) -> None:
        _close(self.pool, self.errors)
        self.pool = None
