"""pool_aware (the default): pick the worker with the lowest estimated time to first token.

For worker w and a prompt of P tokens whose first L_w tokens w holds in its own KV cache and
whose first S tokens the shared pool holds:

    pool_w     = max(0, S - L_w)            tokens w would load from the pool
    computed_w = P - L_w - pool_w           tokens w must prefill
    TTFT_w     = base + q_w x queue_cost + (ahead_w + computed_w) x prefill_cost
                 + pool_w x load_cost

q_w is the number of requests ahead of this one on w (its occupancy); ahead_w the prompt
tokens this gateway sent to w that w has not yet computed (their first token has not come
back). A worker scheduling first come, first served computes those before this prompt, so a
cold prompt queued behind another cold prompt waits for its whole prefill, while one behind
a pool hit hardly waits: a count of requests cannot tell the two apart. The four costs are
learned online from measured TTFTs (normalised least mean squares on the same features,
clamped at zero, starting from priors measured on the CPU machine), so the same policy fits
a GPU cluster after a few hundred requests. Ties go to the worker the prompt's first block
hashes to, so several gateways agree. Reasons: `local` (w holds most of the prompt), `pool`
(w loads most of its prefix from the pool), `cold` (mostly computed), `balance` (a worker
holding more of the prefix was passed over because of its queue).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from gateway.policies.base import Choice, RequestInfo, TieBreak
from gateway.workers import WorkerState

KTOK = 1000.0  # features in thousands of tokens keep the learning rate well scaled


class CostModel:
    """TTFT ≈ base + queue x q + computed x prefill + pool x load (seconds; tokens / 1000),
    fitted online by recursive least squares with a forgetting factor, so it tracks a
    machine whose speed changes and converges in tens of observations. Predictions use the
    coefficients clamped at zero (a cost is never negative)."""

    NAMES = ("base", "queue", "prefill", "load")

    def __init__(self, base: float = 0.05, queue: float = 1.0, prefill: float = 2.6,
                 load: float = 0.02, forget: float = 0.995, confidence: float = 10.0) -> None:
        self.theta = [base, queue, prefill, load]
        # Inverse covariance: small = trust the priors; grows with what is not yet seen.
        self.p = [[confidence if i == j else 0.0 for j in range(4)] for i in range(4)]
        self.forget = forget
        self.observations = 0

    def __getattr__(self, name: str) -> float:
        if name in CostModel.NAMES:
            return max(0.0, self.theta[CostModel.NAMES.index(name)])
        raise AttributeError(name)

    @staticmethod
    def features(queue: float, computed: float, pool: float) -> list[float]:
        return [1.0, queue, computed / KTOK, pool / KTOK]

    def predict(self, queue: float, computed: float, pool: float) -> float:
        x = self.features(queue, computed, pool)
        return sum(max(0.0, t) * v for t, v in zip(self.theta, x, strict=True))

    def learn(self, queue: float, computed: float, pool: float, ttft_s: float) -> None:
        x = self.features(queue, computed, pool)
        px = [sum(self.p[i][j] * x[j] for j in range(4)) for i in range(4)]
        denom = self.forget + sum(x[i] * px[i] for i in range(4))
        gain = [v / denom for v in px]
        err = ttft_s - sum(t * v for t, v in zip(self.theta, x, strict=True))
        self.theta = [t + g * err for t, g in zip(self.theta, gain, strict=True)]
        self.p = [[(self.p[i][j] - gain[i] * px[j]) / self.forget for j in range(4)]
                  for i in range(4)]
        # Directions the traffic never excites (say, an always-empty queue) would grow
        # without bound under forgetting ("windup"); cap the covariance.
        top = max(self.p[i][i] for i in range(4))
        if top > 1e4:
            self.p = [[v * 1e4 / top for v in row] for row in self.p]
        self.observations += 1


@dataclass(frozen=True)
class Split:
    queue: float
    local: int
    pool: int
    computed: int
    ahead: int  # prompt tokens ahead of this one on the worker, not yet computed


class PoolAware:
    name: ClassVar[str] = "pool_aware"
    uses_prefixes: ClassVar[bool] = True
    uses_pool: ClassVar[bool] = True

    def __init__(self, model: CostModel | None = None) -> None:
        self.model = model or CostModel()
        self._lock = threading.Lock()
        self._tie = TieBreak()

    def split(self, w: WorkerState, request: RequestInfo) -> Split:
        bt = request.block_tokens
        local = min(request.local_blocks.get(w.id, 0) * bt, request.prompt_tokens)
        pool = max(0, min(request.pool_blocks_for(w.id) * bt, request.prompt_tokens) - local)
        computed = max(0, request.prompt_tokens - local - pool)
        return Split(w.load() * w.record.capacity, local, pool, computed, w.pending_prefill)

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> Choice | None:
        if not workers:
            return None
        scored = []
        for w in workers:
            s = self.split(w, request)
            scored.append((self.model.predict(s.queue, s.ahead + s.computed, s.pool), s, w))
        best = min(e for e, _, _ in scored)
        tied = [w for e, _, w in scored if e <= best + 1e-9]
        chosen = self._tie(request, tied)
        estimate, s = next((e, x) for e, x, w in scored if w is chosen)
        most_local = max(x.local for _, x, _ in scored)
        if s.local < most_local:
            reason = "balance"
        elif s.local > 0 and s.local >= max(s.pool, s.computed):
            reason = "local"
        elif s.pool > 0 and s.pool >= s.computed:
            reason = "pool"
        else:
            reason = "cold"
        return Choice(chosen, reason, estimate, (s.queue, s.ahead + s.computed, s.pool),
                      prefill_tokens=s.computed)

    def observe(self, choice: Choice, request: RequestInfo, ttft_s: float) -> None:
        if len(choice.features) == 3:
            queue, computed, pool = choice.features
            with self._lock:
                self.model.learn(queue, computed, pool, ttft_s)
