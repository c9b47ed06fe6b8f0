"""schemathesis against the gateway's own /openapi.json, over real HTTP (shared by the unit
and e2e fuzz tests, and by the long randomized run, bench/fuzz_gateway.py).

The tests are reproducible: every (operation, generation mode) is generated from a fixed
seed (derived from `seed`, the operation's label and the mode by SHA-256, never Python's
per-process `hash()`), hypothesis is derandomized and keeps no example database, so a run
draws the same requests on every machine and every time, until the code of the gateway's
schema, schemathesis or hypothesis changes. Only bench/fuzz_gateway.py draws at random (a
seed it prints, so a run can be replayed with `--seed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import hypothesis
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
SEED = 16  # of `make test`'s runs: change it to draw other (equally fixed) requests


def operation_seed(seed: int, label: str, mode: GenerationMode) -> int:
    """A stable seed per (run seed, operation, mode): the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}|{label}|{mode.value}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def operations(base_url: str) -> Iterator[tuple[schemathesis.APIOperation, GenerationMode]]:
    """Every operation of base_url's /openapi.json with the generation modes it gets:
    positive cases for all, negative (schema-breaking) ones for the POST bodies too."""
    api = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    for result in api.get_all_operations():
        op = result.ok()
        yield op, GenerationMode.POSITIVE
        if op.method.upper() == "POST":
            yield op, GenerationMode.NEGATIVE


def drive(op: schemathesis.APIOperation, mode: GenerationMode, examples: int,
          seed: int | None, test: Callable[[schemathesis.Case], None]) -> None:
    """Run `test` on `examples` cases of `op` drawn in `mode`. With a `seed`, the draw is
    fixed (derandomized); None draws at random. An exception from `test` fails the run
    (hypothesis shrinks it first), as a test wants; a caller that wants to go on catches
    inside `test`. (schemathesis's pytest plugin does not work with pytest 9, so its
    strategies are driven through hypothesis here.)"""

    @settings(max_examples=examples, deadline=None, database=None,
              derandomize=seed is not None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        test(case)

    if seed is not None:
        run = hypothesis.seed(operation_seed(seed, op.label, mode))(run)
    run()


def fuzz(base_url: str, prepare: Callable[[schemathesis.Case], None], examples: int,
         timeout_s: float, seed: int = SEED) -> list[str]:
    """Run every operation of base_url's /openapi.json through schemathesis, positive and
    negative cases, drawn from `seed` (fixed: see the module's doc); returns the labels of
    the operations run."""
    labels: list[str] = []
    for op, mode in operations(base_url):
        if op.label not in labels:
            labels.append(op.label)

        def run(case: schemathesis.Case) -> None:
            prepare(case)
            case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=timeout_s)

        drive(op, mode, examples, seed, run)
    return labels


def aim_at(model: str) -> Callable[[schemathesis.Case], None]:
    """Most generated requests name the served model (they reach a worker); the rest keep
    their generated name (a 404 from the gateway). Which ones is a function of the body
    alone (`hash_of`), so a fixed draw aims the same requests every time."""
    def prepare(case: schemathesis.Case) -> None:
        if isinstance(case.body, dict) and "model" in case.body and hash_of(case.body) % 3:
            case.body["model"] = model
    return prepare


def capped(model: str, caps: tuple[tuple[str, int], ...] = (
        ("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2))
           ) -> Callable[[schemathesis.Case], None]:
    """`aim_at(model)`, and token counts capped so a run stays short on a CPU: a valid value
    stays valid, an invalid one stays invalid. null is valid and means "up to the context
    length": ~2,000 tokens on a shared CPU core ran past the timeout (and hypothesis shrank
    it for 8 minutes more)."""
    aim = aim_at(model)

    def prepare(case: schemathesis.Case) -> None:
        aim(case)
        body = case.body
        if not isinstance(body, dict):
            return
        for name, cap in caps:
            if name not in body:
                continue
            value = body[name]
            if value is None or (isinstance(value, int) and not isinstance(value, bool)
                                 and value > cap):
                body[name] = cap
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = caps[0][1]
    return prepare


def hash_of(body: dict[str, object]) -> int:
    """A stable hash of a JSON-like body: SHA-256 of its canonical JSON (never Python's
    `hash()`, which differs per process; anything not JSON is written as its type's name,
    never a `repr` that could hold a memory address)."""
    text = json.dumps(body, sort_keys=True, default=lambda o: type(o).__name__,
                      ensure_ascii=True, allow_nan=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
