"""The connector's counters, carried by vLLM's KV-connector stats to the worker's /metrics.

Both sides of the connector count into a `BelugaStats` between two collections; vLLM merges
the worker's and the scheduler's, sends them to the API server process, and calls
`BelugaPromMetrics.observe`, which adds them to Prometheus counters named per DESIGN.md:

    beluga_worker_prompt_tokens_total{source="local"|"pool"|"computed"}
    beluga_worker_pool_load_bytes_total, beluga_worker_pool_save_bytes_total
    beluga_worker_pool_load_seconds_total, beluga_worker_pool_save_seconds_total
    beluga_worker_pool_blocks_loaded_total, beluga_worker_pool_blocks_saved_total
    beluga_worker_pool_load_errors_total     blocks that failed validation (recomputed)
    beluga_worker_pool_save_errors_total     blocks that could not be stored
    beluga_worker_pool_unshared_requests_total  requests whose identity keys cannot express
    beluga_worker_pool_errors_total{kind}    pool calls that failed (busy, corrupt, closed,
                                             ...: beluga/pool_errors.py KINDS); each one
                                             served its request or step without the pool
    beluga_worker_pool_enabled               1 while this worker shares through the pool
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from beluga.pool_errors import KINDS as POOL_ERROR_KINDS

COUNTERS: dict[str, str] = {
    "local_tokens": "Prompt tokens found in the worker's own KV cache.",
    "pool_tokens": "Prompt tokens loaded from the shared pool instead of computed.",
    "computed_tokens": "Prompt tokens the worker computed (prefill).",
    "load_bytes": "Bytes copied from the pool into the KV cache.",
    "save_bytes": "Bytes copied from the KV cache into the pool.",
    "load_seconds": "Time spent copying blocks from the pool.",
    "save_seconds": "Time spent copying blocks into the pool.",
    "blocks_loaded": "Blocks loaded from the pool.",
    "blocks_saved": "Blocks stored in the pool (new ones; present ones are skipped).",
    "load_errors": "Blocks that failed validation on load and were recomputed.",
    "save_errors": "Blocks that could not be stored (pool full or an error).",
    "unshared_requests": "Requests kept away from the pool: block keys cannot express what "
    "decides their KV (multimodal inputs, prompt embeddings, an unreadable LoRA adapter).",
}
ENABLED = "pool_enabled"  # gauge: 1 sharing, 0 not (reported, not summed)
# Failed pool calls by kind: one counter per kind, "pool_errors:<kind>" in the stats' data
# (flat, so vLLM carries it like the others).
POOL_ERRORS = "pool_errors:"
POOL_ERROR_COUNTERS = frozenset(POOL_ERRORS + kind for kind in POOL_ERROR_KINDS)


def _summed(name: str) -> bool:
    return name in COUNTERS or name in POOL_ERROR_COUNTERS


class BelugaStats(KVConnectorStats):
    """Counters since the last collection; `pool_enabled` is the latest state seen."""

    def add(self, name: str, value: float) -> None:
        if name not in COUNTERS:
            raise KeyError(name)
        self.data[name] = self.data.get(name, 0) + value

    def pool_error(self, kind: str) -> None:
        """One failed pool call of `kind` (beluga/pool_errors.py KINDS; others: "other")."""
        name = POOL_ERRORS + kind
        if name not in POOL_ERROR_COUNTERS:
            name = POOL_ERRORS + "other"
        self.data[name] = self.data.get(name, 0) + 1

    def pool_errors(self) -> dict[str, int]:
        """The failed pool calls counted so far, by kind."""
        return {name[len(POOL_ERRORS):]: int(v) for name, v in self.data.items()
                if name in POOL_ERROR_COUNTERS}

    def set_enabled(self, enabled: bool) -> None:
        self.data[ENABLED] = 1 if enabled else 0

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if name == ENABLED:
                # Across the worker and scheduler sides: sharing only if both can.
                self.data[ENABLED] = min(self.data.get(ENABLED, value), value)
            elif _summed(name):
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not self.data

    def take(self) -> BelugaStats | None:
        """This object's data as a new stats object, leaving this one empty."""
        if not self.data:
            return None
        out = BelugaStats(data=dict(self.data))
        self.reset()
        return out


class BelugaPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: VllmConfig,
                 metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        tokens = self._counter_cls(
            name="beluga_worker_prompt_tokens",
            documentation="Prompt tokens by where their KV came from.",
            labelnames=[*labelnames, "source"])
        others = {
            name: self._counter_cls(name=f"beluga_worker_pool_{name}",
                                    documentation=doc, labelnames=labelnames)
            for name, doc in COUNTERS.items() if not name.endswith("_tokens")
        }
        enabled = self._gauge_cls(
            name="beluga_worker_pool_enabled",
            documentation="1 while this worker shares KV blocks through the pool.",
            labelnames=labelnames, multiprocess_mode="mostrecent")  # type: ignore[call-arg]
        errors = self._counter_cls(
            name="beluga_worker_pool_errors",
            documentation="Pool calls that failed, by kind (busy, corrupt, closed, ...); each "
            "one served its request or step without the pool.",
            labelnames=[*labelnames, "kind"])
        self._metrics: dict[int, dict[str, Any]] = {}
        for engine, values in per_engine_labelvalues.items():
            m: dict[str, Any] = {
                f"{src}_tokens": tokens.labels(*values, src) for src in ("local", "pool",
                                                                          "computed")}
            m.update({name: c.labels(*values) for name, c in others.items()})
            m[ENABLED] = enabled.labels(*values)
            m.update({POOL_ERRORS + kind: errors.labels(*values, kind)
                      for kind in POOL_ERROR_KINDS})
            self._metrics[engine] = m

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        metrics = self._metrics.get(engine_idx)
        if metrics is None:
            return
        for name, value in transfer_stats_data.items():
            if name == ENABLED:
                metrics[ENABLED].set(value)
            elif _summed(name) and value > 0:
                metrics[name].inc(value)

