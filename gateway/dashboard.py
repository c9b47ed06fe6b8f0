"""The built-in dashboard (/dashboard): time series sampled from the gateway's own metrics.

Every `interval_s` the sampler reads the gateway's Prometheus registry (no second set of
counters to drift from /metrics), the worker snapshot and, when the shared pool is mapped on
this host, the pool's own statistics, and appends one point per series:

    ttft_p50 / ttft_p95 / ttft_p99   seconds, over the interval (histogram bucket deltas,
                                     interpolated as Prometheus' histogram_quantile does)
    tokens_local / _pool / _computed prompt tokens per second by where their KV comes from
    requests                         answered requests per second
    pool_used                        fraction of pool slots holding a block
    pool_evictions                   evictions per second
    cached_predicted / _actual       prompt tokens per second the chosen workers were
                                     predicted to find cached, and found (their reports)
    mispredicted                     requests per second off the prediction by a block+
    hit_local / hit_pool             fraction of the interval's prompt tokens found in the
                                     workers' own caches / loaded from the pool (a rate)
    share[worker] / load[worker]     fraction of the interval's requests each worker answered,
                                     and its occupancy as the router sees it

and the page's headline (`headline`), over the last HEADLINE_S seconds: TTFT p50, the shares
of prompt tokens from the local caches and from the pool, requests per second, and the
pool's fill now.

The page (static/dashboard.html) draws them with uPlot, installed from npm by `make setup`
and served from here: nothing is fetched from a CDN.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.workers import WorkerState
from kvpool import PoolStats

STATIC = Path(__file__).resolve().parent / "static"
UPLOT = STATIC / "node_modules" / "uplot" / "dist"
SERIES = ("ttft_p50", "ttft_p95", "ttft_p99", "tokens_local", "tokens_pool", "tokens_computed",
          "requests", "pool_used", "pool_evictions", "cached_predicted", "cached_actual",
          "mispredicted", "hit_local", "hit_pool")
HEADLINE_S = 30.0  # the window of the headline numbers


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """q-quantile from cumulative (upper bound, count) pairs, +Inf last; None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


class Dashboard:
    def __init__(self, registry: CollectorRegistry,
                 workers: Callable[[], Sequence[WorkerState]],
                 pool_stats: Callable[[], PoolStats | None],
                 interval_s: float = 2.0, keep: int = 300) -> None:
        self._registry = registry
        self._workers = workers
        self._pool_stats = pool_stats
        self.interval_s = interval_s
        self._t: deque[float] = deque(maxlen=keep)
        self._series: dict[str, deque[float | None]] = {
            name: deque(maxlen=keep) for name in SERIES}
        self._share: dict[str, deque[float | None]] = {}
        self._load: dict[str, deque[float | None]] = {}
        self._keep = keep
        self._last: dict[str, Any] | None = None
        # cumulative reads of the last HEADLINE_S seconds (and one before), for the headline
        self._reads: deque[dict[str, Any]] = deque(
            maxlen=max(2, math.ceil(HEADLINE_S / max(interval_s, 1e-3)) + 1))
        self._headline: dict[str, float | None] = {}

    # -- sampling ------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        """Cumulative values now."""
        ttft: dict[float, float] = {}
        tokens: dict[str, float] = {}
        answered: dict[str, float] = {}
        requests = mispredicted = 0.0
        cached: dict[str, float] = {}
        for metric in self._registry.collect():
            for s in metric.samples:
                if s.name == "beluga_gateway_ttft_seconds_bucket":
                    bound = float(s.labels["le"])
                    ttft[bound] = ttft.get(bound, 0.0) + s.value
                elif s.name == "beluga_gateway_prompt_tokens_total":
                    tokens[s.labels["source"]] = s.value
                elif s.name == "beluga_gateway_e2e_seconds_count":
                    w = s.labels["worker"]
                    answered[w] = answered.get(w, 0.0) + s.value
                elif s.name == "beluga_gateway_requests_total":
                    requests += s.value
                elif s.name == "beluga_gateway_cached_tokens_total":
                    cached[s.labels["kind"]] = s.value
                elif s.name == "beluga_gateway_cache_mispredictions_total":
                    mispredicted += s.value
        stats = self._pool_stats()
        return {"at": time.monotonic(), "ttft": ttft, "tokens": tokens,
                "answered": answered, "requests": requests, "pool": stats,
                "cached": cached, "mispredicted": mispredicted}

    @staticmethod
    def _between(last: dict[str, Any], now: dict[str, Any]) -> dict[str, float | None]:
        """TTFT quantiles, requests/s, token rates and shares from one read to another."""
        dt = max(1e-6, now["at"] - last["at"])
        buckets = sorted((b, c - last["ttft"].get(b, 0.0)) for b, c in now["ttft"].items())
        out: dict[str, float | None] = {
            "ttft_p50": histogram_quantile(0.50, buckets),
            "ttft_p95": histogram_quantile(0.95, buckets),
            "ttft_p99": histogram_quantile(0.99, buckets),
            "requests": (now["requests"] - last["requests"]) / dt,
        }
        tokens = {source: now["tokens"].get(source, 0.0) - last["tokens"].get(source, 0.0)
                  for source in ("local", "pool", "computed")}
        total = sum(tokens.values())
        for source, n in tokens.items():
            out[f"tokens_{source}"] = n / dt
        out["hit_local"] = tokens["local"] / total if total > 0 else None
        out["hit_pool"] = tokens["pool"] / total if total > 0 else None
        return out

    def sample(self) -> None:
        now = self._read()
        last, self._last = self._last, now
        self._reads.append(now)
        pool_now: PoolStats | None = now["pool"]
        window = self._between(self._reads[0], now) if len(self._reads) > 1 else {}
        self._headline = {
            "window_s": round(now["at"] - self._reads[0]["at"], 1),
            "ttft_p50_s": window.get("ttft_p50"),
            "local_share": window.get("hit_local"), "pool_share": window.get("hit_pool"),
            "requests_per_s": window.get("requests"),
            "pool_used": pool_now.used_slots / pool_now.slot_count if pool_now else None}
        if last is None:
            return
        dt = max(1e-6, now["at"] - last["at"])
        point = self._between(last, now)
        for kind in ("predicted", "actual"):
            point[f"cached_{kind}"] = (now["cached"].get(kind, 0.0)
                                       - last["cached"].get(kind, 0.0)) / dt
        point["mispredicted"] = (now["mispredicted"] - last["mispredicted"]) / dt
        pool: PoolStats | None = now["pool"]
        old: PoolStats | None = last["pool"]
        point["pool_used"] = pool.used_slots / pool.slot_count if pool else None
        point["pool_evictions"] = ((pool.evictions - old.evictions) / dt
                                   if pool and old else None)
        self._t.append(time.time())
        for name in SERIES:
            self._series[name].append(point[name])
        done = {w: now["answered"].get(w, 0.0) - last["answered"].get(w, 0.0)
                for w in now["answered"]}
        total = sum(done.values())
        workers = {w.id: w for w in self._workers()}
        for wid in set(workers) | set(self._share):
            for table, value in (
                    (self._share, done.get(wid, 0.0) / total if total else None),
                    (self._load, workers[wid].load() if wid in workers else None)):
                column = table.get(wid)
                if column is None:  # a new worker: no history before now
                    column = table[wid] = deque([None] * (len(self._t) - 1),
                                                maxlen=self._keep)
                column.append(value)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    # -- reading ---------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "headline": dict(self._headline),
            "t": list(self._t),
            "series": {name: list(values) for name, values in self._series.items()},
            "share": {w: list(v) for w, v in sorted(self._share.items())},
            "load": {w: list(v) for w, v in sorted(self._load.items())},
        }
