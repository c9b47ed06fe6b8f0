"""The connector's step plan crosses from vLLM's scheduler process to its worker process:
versioned, and validated on arrival."""

from __future__ import annotations

import json

import pytest

from engine.connector_meta import (
    BelugaMetadata,
    BelugaWorkerMeta,
    LoadSpec,
    MetadataError,
    SaveSpec,
    StepPlan,
    decode_plan,
    encode_plan,
)

KEY = bytes(range(32))


def test_plan_round_trips() -> None:
    plan = StepPlan(7, (LoadSpec("r1", (4, 9), (11, 12), (KEY[::-1], KEY)),),
                    (SaveSpec("r2", (KEY, KEY[::-1]), (3, 5)),))
    assert BelugaMetadata(plan).plan() == plan
    assert decode_plan(encode_plan(StepPlan(1))) == StepPlan(1)


def payload(**change: object) -> bytes:
    data: dict[str, object] = {"v": 2, "step": 1, "loads": [], "saves": []}
    data.update(change)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("raw", "match"), [
    (b"not json", "not JSON"),
    (payload(v=1), "version 1"),
    (payload(step=-1), "step must be"),
    (payload(loads={"a": 1}), "loads must be a list"),
    (payload(loads=[{"req": "r", "slots": [1, 2], "blocks": [1], "keys": []}]),
     "as many slots"),
    (payload(loads=[{"req": "r", "slots": [1], "blocks": [1], "keys": []}]), "as many slots"),
    (payload(loads=[{"req": "r", "slots": [1], "blocks": [1]}]), "keys must be a list"),
    (payload(loads=[{"req": "", "slots": [], "blocks": [], "keys": []}]), "req must be"),
    (payload(loads=[{"req": "r", "slots": [True], "blocks": [1], "keys": []}]),
     "slot must be"),
    (payload(saves=[{"req": "r", "keys": ["zz" * 32], "blocks": [1]}]), "64 hex"),
    (payload(saves=[{"req": "r", "keys": ["ab"], "blocks": [1]}]), "64 hex"),
    (payload(saves=[{"req": "r", "keys": [KEY.hex()], "blocks": []}]), "as many keys"),
])
def test_bad_payloads_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(MetadataError, match=match):
        decode_plan(raw)


def test_worker_meta_aggregates_across_workers() -> None:
    a = BelugaWorkerMeta({1, 2}, {5})
    b = BelugaWorkerMeta({2, 3}, {6})
    merged = a.aggregate(b)
    assert isinstance(merged, BelugaWorkerMeta)
    assert merged.steps() == {1, 2, 3} and merged.bad() == {5, 6}
    with pytest.raises(MetadataError):
        BelugaWorkerMeta({-1}).steps()
