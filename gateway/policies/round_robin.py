"""round_robin: each request to the next worker, in id order; knows nothing else."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

from gateway.policies.base import Choice, RequestInfo
from gateway.workers import WorkerState


class RoundRobin:
    name: ClassVar[str] = "round_robin"
    uses_prefixes: ClassVar[bool] = False
    uses_pool: ClassVar[bool] = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> Choice | None:
        if not workers:
            return None
        ordered = sorted(workers, key=lambda w: w.id)
        return Choice(worker=ordered[next(self._turn) % len(ordered)], reason="round_robin")

    def observe(self, choice: Choice, request: RequestInfo, ttft_s: float) -> None:
        return
