"""Routing policies: one module each behind the `Policy` interface."""

from __future__ import annotations

from gateway.policies.base import Choice, Policy, RequestInfo
from gateway.policies.least_loaded import LeastLoaded

POLICIES: dict[str, type[Policy]] = {LeastLoaded.name: LeastLoaded}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None


__all__ = ["Choice", "Policy", "RequestInfo", "make_policy", "POLICIES"]
