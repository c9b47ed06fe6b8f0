"""The routing policy interface: ``select(workers, request) -> Choice``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from gateway.workers import WorkerState


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about a request."""

    model: str
    endpoint: str
    stream: bool


@dataclass(frozen=True)
class Choice:
    """The chosen worker and why (a metric label and the `x-beluga-route` header)."""

    worker: WorkerState
    reason: str


class Policy(Protocol):
    name: ClassVar[str]

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> Choice | None:
        """Pick one of `workers` (all healthy, all serving the model); None if empty."""
        ...
