"""The gateway's Prometheus metrics (served on /metrics), named per DESIGN.md.

    beluga_gateway_requests_total{endpoint, status, model}   model: the answering worker's
                                                             ("-": none answered)
    beluga_gateway_ttft_seconds{worker, policy, model}       streaming requests
    beluga_gateway_e2e_seconds{worker, policy, model}        every answered request
    beluga_gateway_itl_seconds{worker, model}                between streamed chunks
    beluga_gateway_tokens_total{kind, model}                 prompt | completion (usage)
    beluga_gateway_route_decisions_total{policy, reason}
    beluga_gateway_prompt_tokens_total{source}               local | pool | computed, as
                                                             estimated when routing
    beluga_gateway_pool_lookups_total{result}                pool lookups: ok | error |
                                                             timeout (asked of a worker)
                                                             | busy | corrupt | closed ...
                                                             (the pool mapped here failed:
                                                             beluga/pool_errors.py KINDS)
    beluga_gateway_worker_healthy{worker}                    1 in routing, 0 taken out
    beluga_gateway_worker_in_flight{worker}                  this gateway's open requests
    beluga_gateway_worker_load{worker}                       occupancy the router sees
    beluga_gateway_worker_pending_prefill_tokens{worker}     prompt tokens sent, first
                                                             token not yet back
    beluga_gateway_registry_invalid_records_total{kind, reason}
                                                             Redis records skipped (worker,
                                                             hints, hint_keys; reasons:
                                                             beluga/registry.py REASONS)
    beluga_gateway_cached_tokens_total{kind}                 predicted | actual: prompt
                                                             tokens routing expected the
                                                             chosen worker to find cached
                                                             (its own cache or the pool),
                                                             and what it reported (vLLM's
                                                             usage.prompt_tokens_details)
    beluga_gateway_cache_prediction_error_tokens             |actual - predicted| per request
    beluga_gateway_cache_mispredictions_total{direction}     off by a block or more: over
                                                             (fewer found than predicted) |
                                                             under
    beluga_pool_slots, beluga_pool_used_slots, beluga_pool_pinned_slots,
    beluga_pool_evictions_total, beluga_pool_inserts_total   the shared pool, when this
                                                             gateway maps it (same host)
Each gateway process has its own registry (several apps in one test process never clash).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from beluga.pool_errors import KINDS as POOL_ERROR_KINDS
from beluga.registry import KINDS as REGISTRY_KINDS
from beluga.registry import REASONS as REGISTRY_REASONS
from gateway.policies import Choice, RequestInfo
from gateway.workers import WorkerState
from kvpool import PoolStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_COUNT = 1 << 53  # token counts a worker reports beyond this are not counted
ERROR_BUCKETS = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
                 16384.0)
# Label values of beluga_gateway_pool_lookups_total (a bounded set; others count as error).
POOL_LOOKUP_RESULTS = frozenset(("ok", "error", "timeout", *POOL_ERROR_KINDS))


class GatewayMetrics:
    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.registry = CollectorRegistry()
        r = self.registry
        # `model` is the answering worker's (registry) model, never the client's string:
        # label values stay as few as the workers serve.
        self.requests = Counter("beluga_gateway_requests", "Requests answered, by status.",
                                ["endpoint", "status", "model"], registry=r)
        self.ttft = Histogram("beluga_gateway_ttft_seconds",
                              "Time to the first streamed byte of the answer.",
                              ["worker", "policy", "model"], buckets=LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram("beluga_gateway_e2e_seconds", "Time to the whole answer.",
                             ["worker", "policy", "model"], buckets=LATENCY_BUCKETS,
                             registry=r)
        self.itl = Histogram("beluga_gateway_itl_seconds",
                             "Time between streamed chunks (inter-token latency).",
                             ["worker", "model"], buckets=ITL_BUCKETS, registry=r)
        self.decisions = Counter("beluga_gateway_route_decisions",
                                 "Routing decisions, by policy and reason.",
                                 ["policy", "reason"], registry=r)
        self.prompt_tokens = Counter("beluga_gateway_prompt_tokens",
                                     "Prompt tokens by where the chosen worker gets their KV "
                                     "(estimated at routing).", ["source"], registry=r)
        self._local, self._pool, self._computed = (
            self.prompt_tokens.labels(source) for source in ("local", "pool", "computed"))
        self.pool_lookups = Counter("beluga_gateway_pool_lookups",
                                    "Pool lookups for routing, by result: ok; error or "
                                    "timeout (a worker asked: the pool not mapped on this "
                                    "host); busy, corrupt, closed, ... (the pool mapped here "
                                    "failed; routed as if it held none).", ["result"],
                                    registry=r)
        self.cached = Counter("beluga_gateway_cached_tokens", "Prompt tokens found cached "
                              "by the chosen worker (its own cache or the pool): predicted "
                              "when routing, actual as the worker reported.", ["kind"],
                              registry=r)
        self.prediction_error = Histogram(
            "beluga_gateway_cache_prediction_error_tokens", "Per request, how far the cached "
            "prompt tokens the worker reported were from routing's prediction.",
            buckets=ERROR_BUCKETS, registry=r)
        self.mispredicted = Counter(
            "beluga_gateway_cache_mispredictions", "Requests whose cached prompt tokens were "
            "off routing's prediction by a block or more: over (fewer than predicted: hints "
            "that promised blocks the worker did not have, or keys that differ between "
            "gateway and worker), under (more: blocks routing did not know of).",
            ["direction"], registry=r)
        for kind in ("predicted", "actual"):  # exported from the start, as 0
            self.cached.labels(kind)
        for direction in ("over", "under"):
            self.mispredicted.labels(direction)
        self.tokens = Counter("beluga_gateway_tokens", "Tokens of answered requests, from "
                              "the workers' usage reports.", ["kind", "model"], registry=r)
        self.unkeyed = Counter("beluga_gateway_prompts_unkeyed",
                               "Requests routed without prefix information, by reason: "
                               "timeout (routing_timeout_s), request_template (a template "
                               "sent with the request, not trusted), untokenizable, error, "
                               "tokenizer_loading (the gateway just started), "
                               "adapter_unknown (a LoRA adapter no worker's hints describe), "
                               "stopped (the gateway is shutting down).",
                               ["reason"], registry=r)
        self.truncated = Counter("beluga_gateway_prompts_truncated",
                                 "Prompts keyed on their first routing_max_chars characters "
                                 "only.", registry=r)
        self.refused = Counter("beluga_gateway_refused",
                               "Requests refused before reaching a worker, by reason: "
                               "overloaded (max_concurrent_requests or the body memory "
                               "budget), queue_timeout (no worker connection in time), "
                               "body_timeout, too_large.", ["reason"], registry=r)
        self.background_errors = Counter("beluga_gateway_background_errors",
                                         "Exceptions caught in a background loop (which "
                                         "goes on), by task.", ["task"], registry=r)
        self.invalid_records = Counter(
            "beluga_gateway_registry_invalid_records", "Redis records (worker registry, "
            "hints, hint-key sets) refused by validation, each time one is read, by kind and "
            "reason.", ["kind", "reason"], registry=r)
        # Labelled children by label values, looked up once: `labels()` validates, converts
        # and locks on every call, several times per request. (Bounded like the registry
        # itself: one per label combination ever used.)
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def watch_workers(self, snapshot: Callable[[], Sequence[WorkerState]]) -> None:
        """Per-worker gauges, read from the registry snapshot at scrape time."""
        self.registry.register(_WorkerGauges(snapshot))

    def watch_pool(self, stats: Callable[[], PoolStats | None]) -> None:
        """The shared pool's own statistics, read at scrape time (absent without a pool)."""
        self.registry.register(_PoolGauges(stats))

    def usage(self, usage: object, model: str = "-") -> None:
        if not isinstance(usage, dict):
            return
        for kind in ("prompt", "completion"):
            value = usage.get(f"{kind}_tokens")
            if type(value) is int and 0 <= value <= MAX_COUNT:
                self.child(self.tokens, kind, model).inc(value)

    def prediction(self, predicted_held: int | None, block_tokens: int,
                   usage: object) -> None:
        """Routing's prediction against what the worker reported: `predicted_held` prompt
        tokens the chosen worker was expected to find cached (None: routing knew nothing
        of the prompt), capped as vLLM caps a hit (never the block of the last prompt
        token), against usage.prompt_tokens_details.cached_tokens."""
        if predicted_held is None or block_tokens <= 0 or not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details")
        actual = details.get("cached_tokens") if isinstance(details, dict) else None
        if type(prompt) is not int or type(actual) is not int or not 0 < prompt <= MAX_COUNT \
                or not 0 <= actual <= prompt:
            return  # a worker that does not report it (--enable-prompt-tokens-details)
        predicted = min(predicted_held, (prompt - 1) // block_tokens * block_tokens)
        self.child(self.cached, "predicted").inc(predicted)
        self.child(self.cached, "actual").inc(actual)
        self.prediction_error.observe(abs(actual - predicted))
        if abs(actual - predicted) >= block_tokens:
            self.child(self.mispredicted, "over" if predicted > actual else "under").inc()

    def prompt_unkeyed(self, reason: str) -> None:
        self.child(self.unkeyed, reason).inc()

    def prompt_truncated(self) -> None:
        self.truncated.inc()

    def refusal(self, reason: str) -> None:
        self.child(self.refused, reason).inc()

    def background_error(self, task: str) -> None:
        self.child(self.background_errors, task).inc()

    def invalid_record(self, kind: str, reason: str) -> None:
        """One Redis record refused (`InvalidRecords.count`); labels are bounded sets."""
        kind = kind if kind in REGISTRY_KINDS else "other"
        reason = reason if reason in REGISTRY_REASONS else "other"
        self.child(self.invalid_records, kind, reason).inc()

    def pool_lookup(self, result: str) -> None:
        """One pool lookup (on any thread); `result` is one of POOL_LOOKUP_RESULTS."""
        self.child(self.pool_lookups, result if result in POOL_LOOKUP_RESULTS else "error").inc()

    def routed(self, choice: Choice, info: RequestInfo) -> None:
        self.child(self.decisions, self.policy, choice.reason).inc()
        if info.prompt_tokens <= 0:
            return
        bt = info.block_tokens
        local = min(info.local_blocks.get(choice.worker.id, 0) * bt, info.prompt_tokens)
        pool = max(0, min(info.pool_blocks_for(choice.worker.id) * bt, info.prompt_tokens)
                   - local)
        self._local.inc(local)
        self._pool.inc(pool)
        self._computed.inc(info.prompt_tokens - local - pool)

    def answered(self, endpoint: str, status: int, worker: str | None,
                 seconds: float | None, model: str = "-") -> None:
        """One answer; `model` is the answering worker's ("-": no worker answered)."""
        self.child(self.requests, endpoint, str(status), model).inc()
        if worker is not None and seconds is not None and status == 200:
            self.child(self.e2e, worker, self.policy, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerGauges(Collector):
    def __init__(self, snapshot: Callable[[], Sequence[WorkerState]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily("beluga_gateway_worker_healthy",
                                    "1 while the worker is in routing, 0 while taken out.",
                                    labels=["worker"])
        in_flight = GaugeMetricFamily("beluga_gateway_worker_in_flight",
                                      "Requests this gateway has open on the worker.",
                                      labels=["worker"])
        load = GaugeMetricFamily("beluga_gateway_worker_load",
                                 "Occupancy per slot the router sees (reported or own).",
                                 labels=["worker"])
        pending = GaugeMetricFamily("beluga_gateway_worker_pending_prefill_tokens",
                                    "Prompt tokens this gateway sent to the worker for it to "
                                    "compute whose first token has not come back.",
                                    labels=["worker"])
        now = time.monotonic()
        for w in self._snapshot():
            healthy.add_metric([w.id], 1.0 if w.healthy(now) else 0.0)
            in_flight.add_metric([w.id], float(w.in_flight))
            load.add_metric([w.id], w.load())
            pending.add_metric([w.id], float(w.pending_prefill))
        yield healthy
        yield in_flight
        yield load
        yield pending


class _PoolGauges(Collector):
    def __init__(self, stats: Callable[[], PoolStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        if st is None:
            return
        yield GaugeMetricFamily("beluga_pool_slots", "Slots in the shared pool.",
                                value=st.slot_count)
        yield GaugeMetricFamily("beluga_pool_used_slots", "Pool slots holding a block.",
                                value=st.used_slots)
        yield GaugeMetricFamily("beluga_pool_pinned_slots",
                                "Pool slots pinned by a pending load.", value=st.pinned_slots)
        yield CounterMetricFamily("beluga_pool_evictions", "Blocks evicted from the pool.",
                                  value=st.evictions)
        yield CounterMetricFamily("beluga_pool_inserts", "Blocks stored in the pool.",
                                  value=st.inserts)
