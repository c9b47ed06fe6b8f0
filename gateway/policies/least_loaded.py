"""least_loaded: the worker with the lowest occupancy; ties go round-robin."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

from gateway.policies.base import Choice, RequestInfo
from gateway.workers import WorkerState


class LeastLoaded:
    name: ClassVar[str] = "least_loaded"
    uses_prefixes: ClassVar[bool] = False
    uses_pool: ClassVar[bool] = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> Choice | None:
        if not workers:
            return None
        lowest = min(w.load() for w in workers)
        tied = sorted((w for w in workers if w.load() == lowest), key=lambda w: w.id)
        return Choice(worker=tied[next(self._turn) % len(tied)], reason="least_loaded")

    def observe(self, choice: Choice, request: RequestInfo, ttft_s: float) -> None:
        return
