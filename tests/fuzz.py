"""schemathesis against the gateway's own /openapi.json, over real HTTP (shared by the unit
and e2e fuzz tests)."""

from __future__ import annotations

import json
from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# No 5xx; every status, content type and body as the document says.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def fuzz(base_url: str, prepare: Callable[[schemathesis.Case], None], examples: int,
         timeout_s: float) -> list[str]:
    """Run every operation of base_url's /openapi.json through schemathesis, positive and
    negative cases; returns the labels of the operations run. (schemathesis's pytest plugin
    does not work with pytest 9, so its strategies are driven through hypothesis here.)"""
    api = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    labels = []
    for result in api.get_all_operations():
        op = result.ok()
        labels.append(op.label)
        modes = [GenerationMode.POSITIVE]
        if op.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                prepare(case)
                case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=timeout_s)

            run()
    return labels


def aim_at(model: str) -> Callable[[schemathesis.Case], None]:
    """Most generated requests name the served model (they reach a worker); the rest keep
    their generated name (a 404 from the gateway)."""
    def prepare(case: schemathesis.Case) -> None:
        if isinstance(case.body, dict) and "model" in case.body and hash_of(case.body) % 3:
            case.body["model"] = model
    return prepare


def hash_of(body: dict[str, object]) -> int:
    return sum(json.dumps(body, sort_keys=True, default=str).encode())


