"""Routing policies: one module each behind the `Policy` interface."""

from __future__ import annotations

from gateway.policies.base import Choice, Policy, RequestInfo
from gateway.policies.least_loaded import LeastLoaded
from gateway.policies.pool_aware import PoolAware
from gateway.policies.prefix_affinity import PrefixAffinity
from gateway.policies.round_robin import RoundRobin

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, PrefixAffinity, PoolAware)}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None


__all__ = ["Choice", "Policy", "RequestInfo", "make_policy", "POLICIES"]
