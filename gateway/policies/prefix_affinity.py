"""prefix_affinity: send a prompt where its prefix is cached, unless that worker is
overloaded — the approximate prefix-tree routing of SGLang's router and vLLM's production
stack, built on what workers report they hold (Redis hints) plus what this gateway routed.

* The worker holding the longest cached prefix of the prompt wins, if its occupancy is
  within `max_imbalance` of the least loaded worker's (reason `prefix`).
* A prompt no worker holds goes to the worker its first block hashes to (rendezvous), so
  every gateway sends a new prefix to the same worker (reason `new_prefix`), under the
  same load check.
* Otherwise the least loaded worker (reason `balance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from gateway.policies.base import Choice, RequestInfo, TieBreak
from gateway.workers import WorkerState


class PrefixAffinity:
    name: ClassVar[str] = "prefix_affinity"
    uses_prefixes: ClassVar[bool] = True
    uses_pool: ClassVar[bool] = False

    def __init__(self, max_imbalance: float = 0.5) -> None:
        self.max_imbalance = max_imbalance  # in occupancy (requests per slot)
        self._tie = TieBreak()

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> Choice | None:
        if not workers:
            return None
        least = min(workers, key=lambda w: (w.load(), w.id))
        fits = [w for w in workers if w.load() <= least.load() + self.max_imbalance]
        best = max(request.local_blocks.get(w.id, 0) for w in fits)
        if best > 0:
            holders = [w for w in fits if request.local_blocks.get(w.id, 0) == best]
            return Choice(self._tie(request, holders), "prefix")
        if any(request.local_blocks.get(w.id, 0) for w in workers):
            return Choice(least, "balance")  # the holders are all overloaded
        least_fit = min(w.load() for w in fits)
        return Choice(self._tie(request, [w for w in fits if w.load() == least_fit]
                                if not request.keys else fits), "new_prefix")

    def observe(self, choice: Choice, request: RequestInfo, ttft_s: float) -> None:
        return
