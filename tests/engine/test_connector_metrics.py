"""Connector counters: merged across the scheduler and worker sides, exported to Prometheus."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.connector_metrics import BelugaPromMetrics, BelugaStats


def test_stats_add_take_and_aggregate() -> None:
    worker = BelugaStats()
    worker.set_enabled(True)
    worker.add("load_bytes", 100)
    worker.add("load_bytes", 50)
    sched = BelugaStats()
    sched.set_enabled(False)
    sched.add("pool_tokens", 256)
    taken = worker.take()
    assert taken is not None and worker.is_empty() and worker.take() is None
    merged = taken.aggregate(sched)
    assert merged.data == {"pool_enabled": 0, "load_bytes": 150, "pool_tokens": 256}
    with pytest.raises(KeyError):
        worker.add("no_such_counter", 1)


def test_prometheus_export_names_and_values() -> None:
    reg = CollectorRegistry()
    types: dict[Any, Any] = {Counter: partial(Counter, registry=reg),
                             Gauge: partial(Gauge, registry=reg),
                             Histogram: partial(Histogram, registry=reg)}
    config: Any = SimpleNamespace(kv_transfer_config=None)
    prom = BelugaPromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe({"pool_enabled": 1, "pool_tokens": 256, "computed_tokens": 17,
                  "load_bytes": 1000, "load_errors": 2}, engine_idx=0)
    prom.observe({"pool_tokens": 128}, engine_idx=0)
    prom.observe({"pool_tokens": 5}, engine_idx=3)  # unknown engine: ignored
    text = generate_latest(reg).decode()
    assert 'beluga_worker_prompt_tokens_total{engine="0",model_name="m",source="pool"} 384.0' \
        in text
    assert 'source="computed"} 17.0' in text
    assert 'beluga_worker_pool_load_bytes_total{engine="0",model_name="m"} 1000.0' in text
    assert 'beluga_worker_pool_load_errors_total{engine="0",model_name="m"} 2.0' in text
    assert 'beluga_worker_pool_enabled{engine="0",model_name="m"} 1.0' in text


def test_pool_errors_are_counted_by_kind_merged_and_exported() -> None:
    worker, sched = BelugaStats(), BelugaStats()
    worker.pool_error("busy")
    worker.pool_error("busy")
    sched.pool_error("corrupt")
    sched.pool_error("no such kind")  # counted as "other": a bounded set of labels
    merged = worker.take()
    assert merged is not None
    merged.aggregate(sched)
    assert merged.pool_errors() == {"busy": 2, "corrupt": 1, "other": 1}
    reg = CollectorRegistry()
    types: dict[Any, Any] = {Counter: partial(Counter, registry=reg),
                             Gauge: partial(Gauge, registry=reg),
                             Histogram: partial(Histogram, registry=reg)}
    config: Any = SimpleNamespace(kv_transfer_config=None)
    prom = BelugaPromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(merged.reduce(), engine_idx=0)
    text = generate_latest(reg).decode()
    assert ('beluga_worker_pool_errors_total{engine="0",kind="busy",model_name="m"} 2.0'
            in text)
    assert 'kind="corrupt",model_name="m"} 1.0' in text
    assert 'kind="closed",model_name="m"} 0.0' in text
