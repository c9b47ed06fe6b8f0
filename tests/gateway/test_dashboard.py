"""The dashboard's sampler: quantiles from histogram deltas, rates, per-worker share/load."""

from __future__ import annotations

import math
import time

import pytest

from beluga.registry import WorkerRecord
from gateway.dashboard import Dashboard, histogram_quantile
from gateway.metrics import GatewayMetrics
from gateway.workers import WorkerState
from kvpool import PoolStats


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.99)
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.9, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0  # beyond: last bound


def worker(wid: str, running: int) -> WorkerState:
    now = time.time()
    return WorkerState(WorkerRecord.model_validate({
        "schema": 1, "id": wid, "url": f"http://{wid}", "model": "m", "capacity": 4,
        "pid": 1, "started_at": now, "heartbeat_at": now, "running": running, "waiting": 0}))


def stats(used: int, evictions: int) -> PoolStats:
    return PoolStats(slot_count=100, slot_size=4096, used_slots=used, pinned_slots=0,
                     writing_slots=0, clients=1, hits=0, misses=0, inserts=0,
                     evictions=evictions, bytes_in=0, bytes_out=0, duplicates=0, full=0,
                     recoveries=0, reclaimed=0, generation=0, corrupt=0, busy=0)


def test_samples_are_interval_rates_and_quantiles() -> None:
    m = GatewayMetrics("pool_aware")
    workers = [worker("a", 2), worker("b", 0)]
    pool = [stats(10, 0)]
    d = Dashboard(m.registry, lambda: workers, lambda: pool[0], interval_s=1.0)
    d.sample()                                  # the baseline: no point yet
    assert d.data()["t"] == []
    for _ in range(3):
        m.ttft.labels("a", "pool_aware", "m").observe(0.3)
        m.e2e.labels("a", "pool_aware", "m").observe(0.5)
    m.e2e.labels("b", "pool_aware", "m").observe(0.5)
    m.prompt_tokens.labels("pool").inc(3000)
    m.prompt_tokens.labels("computed").inc(1000)
    m.prediction(320, 32, {"prompt_tokens": 400, "prompt_tokens_details": {"cached_tokens": 0}})
    m.prediction(64, 32, {"prompt_tokens": 400, "prompt_tokens_details": {"cached_tokens": 64}})
    pool[0] = stats(40, 5)
    m.answered("chat", 404, None, None)  # a request: counted, not charted per worker
    time.sleep(0.2)
    d.sample()
    data = d.data()
    s = data["series"]
    assert len(data["t"]) == 1
    assert 0.25 <= s["ttft_p50"][0] <= 0.5            # inside the 0.25-0.5 bucket
    assert s["tokens_pool"][0] == pytest.approx(3 * s["tokens_computed"][0])
    assert s["tokens_local"][0] == 0
    assert s["pool_used"][0] == pytest.approx(0.4) and s["pool_evictions"][0] > 0
    assert s["cached_predicted"][0] == pytest.approx(6 * s["cached_actual"][0])
    assert s["mispredicted"][0] == pytest.approx(s["cached_actual"][0] / 64)  # 1 of them
    assert data["share"] == {"a": [0.75], "b": [0.25]}
    assert data["load"] == {"a": [0.5], "b": [0.0]}
    assert s["hit_pool"][0] == pytest.approx(0.75) and s["hit_local"][0] == 0
    head = data["headline"]
    assert 0.25 <= head["ttft_p50_s"] <= 0.5 and head["pool_share"] == pytest.approx(0.75)
    assert head["local_share"] == 0 and head["pool_used"] == pytest.approx(0.4)
    assert head["requests_per_s"] > 0 and head["window_s"] > 0
    # A quiet interval: no TTFT to show (null), zero rates; a new worker starts its history.
    workers.append(worker("c", 1))
    d.sample()
    data = d.data()
    assert data["series"]["ttft_p50"][1] is None and data["series"]["tokens_pool"][1] == 0
    assert data["series"]["hit_pool"][1] is None  # no tokens: no rate, not zero
    # the headline still covers the earlier traffic: it is over the last 30 s
    assert data["headline"]["pool_share"] == pytest.approx(0.75)
    assert data["headline"]["ttft_p50_s"] is not None
    assert data["share"]["c"] == [None, None] and data["load"]["c"] == [None, 0.25]
