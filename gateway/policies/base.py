"""The routing policy interface: ``select(workers, request) -> Choice``.

A policy sees the request's shape (prompt length, block keys) and, per worker, how many of
the prompt's leading blocks that worker holds in its own KV cache (`local_blocks`, from the
workers' Redis hints and this gateway's own routing record) and how many the shared pool
holds (`pool_blocks`). Policies are pure functions of what they are given, plus their own
learned state, so they are unit-tested without a network.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from gateway.workers import WorkerState


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about a request."""

    model: str
    endpoint: str
    stream: bool
    prompt_tokens: int = 0
    block_tokens: int = 0
    keys: tuple[bytes, ...] = ()  # block keys of the prompt's full blocks (DESIGN.md)
    local_blocks: Mapping[str, int] = field(default_factory=dict)  # worker id -> blocks
    pool_blocks: int = 0
    # The workers that share that pool (None: every worker)
    pool_workers: frozenset[str] | None = None

    def pool_blocks_for(self, worker_id: str) -> int:
        """The pool's leading blocks, for a worker that can load them (0 for one that does
        not share the pool)."""
        if self.pool_workers is not None and worker_id not in self.pool_workers:
            return 0
        return self.pool_blocks

    def held_tokens(self, worker_id: str) -> int | None:
        """Prompt tokens the worker should find cached, in its own cache or (past that) in
        the pool, as policies assume; None for a prompt routing has no keys for."""
        if self.block_tokens <= 0:
            return None
        return max(self.local_blocks.get(worker_id, 0),
                   self.pool_blocks_for(worker_id)) * self.block_tokens


@dataclass(frozen=True)
class Choice:
    """The chosen worker and why (a metric label and the `x-beluga-route` header)."""

    worker: WorkerState
    reason: str
    estimate_s: float | None = None  # the policy's predicted TTFT, when it has one
    features: tuple[float, ...] = ()  # what the estimate was made of (for observe)
    prefill_tokens: int = 0  # prompt tokens the policy expects the worker to compute


class Policy(Protocol):
    name: ClassVar[str]
    uses_prefixes: ClassVar[bool]  # False: the gateway skips tokenizing for it
    # False: a pool not mapped on this host is not asked about (a round trip to a worker)
    uses_pool: ClassVar[bool]

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> Choice | None:
        """Pick one of `workers` (all healthy, all serving the model); None if empty."""
        ...

    def observe(self, choice: Choice, request: RequestInfo, ttft_s: float) -> None:
        """A measured time to first token of a request this policy routed."""
        ...


def rendezvous(key: bytes, workers: Sequence[WorkerState]) -> WorkerState:
    """The worker with the highest hash of (key, worker id): every gateway picks the same one
    for the same key without talking to the others, and removing a worker moves only its
    own keys."""
    return max(workers, key=lambda w: hashlib.blake2b(key + w.id.encode(), digest_size=8)
               .digest())


class TieBreak:
    """Among equally good workers: the one a prompt's first block hashes to (so gateways
    agree and a prefix sticks), or, for a prompt without a full block, the next in turn
    (nothing to stick to: spread the load)."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def __call__(self, request: RequestInfo, tied: Sequence[WorkerState]) -> WorkerState:
        if len(tied) == 1:
            return tied[0]
        if request.keys:
            return rendezvous(request.keys[0], tied)
        ordered = sorted(tied, key=lambda w: w.id)
        return ordered[next(self._turn) % len(ordered)]
