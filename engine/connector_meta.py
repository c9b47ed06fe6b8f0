"""What the scheduler-side connector tells the worker side each step, and what comes back.

vLLM carries these objects between its processes with its own transport; ours carry a
versioned JSON payload that the receiving side validates field by field, so a mismatch
between the two sides fails loudly instead of loading the wrong blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

META_VERSION = 2  # 2: loads carry their keys
KEY_HEX = 64


class MetadataError(ValueError):
    """A connector payload that this side cannot trust."""


@dataclass(frozen=True)
class LoadSpec:
    """Copy pinned pool slots into engine blocks, slot i -> block_ids[i]; each verified
    against keys[i], the key the scheduler pinned it by."""

    req_id: str
    slots: tuple[int, ...]
    block_ids: tuple[int, ...]
    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class SaveSpec:
    """Store engine blocks under block keys (keys[i] <- block_ids[i]) unless present."""

    req_id: str
    keys: tuple[bytes, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    step: int
    loads: tuple[LoadSpec, ...] = ()
    saves: tuple[SaveSpec, ...] = ()


class BelugaMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    def __init__(self, plan: StepPlan) -> None:
        self.payload = encode_plan(plan)

    def plan(self) -> StepPlan:
        return decode_plan(self.payload)


def encode_plan(plan: StepPlan) -> bytes:
    return json.dumps({
        "v": META_VERSION,
        "step": plan.step,
        "loads": [{"req": x.req_id, "slots": list(x.slots), "blocks": list(x.block_ids),
                   "keys": [k.hex() for k in x.keys]} for x in plan.loads],
        "saves": [{"req": x.req_id, "keys": [k.hex() for k in x.keys],
                   "blocks": list(x.block_ids)} for x in plan.saves],
    }, separators=(",", ":")).encode()


def decode_plan(payload: bytes) -> StepPlan:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise MetadataError(f"connector metadata is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != META_VERSION:
        raise MetadataError(f"connector metadata version {_get(data, 'v')!r}, "
                            f"this worker reads {META_VERSION}")
    step = _int(data.get("step"), "step")
    loads = []
    for item in _list(data.get("loads"), "loads"):
        slots = tuple(_int(s, "slot") for s in _list(_get(item, "slots"), "slots"))
        blocks = tuple(_int(b, "block id") for b in _list(_get(item, "blocks"), "blocks"))
        keys = tuple(_key(k) for k in _list(_get(item, "keys"), "keys"))
        if not len(slots) == len(blocks) == len(keys):
            raise MetadataError("a load has as many slots as block ids and keys")
        loads.append(LoadSpec(_str(_get(item, "req"), "req"), slots, blocks, keys))
    saves = []
    for item in _list(data.get("saves"), "saves"):
        keys = tuple(_key(k) for k in _list(_get(item, "keys"), "keys"))
        blocks = tuple(_int(b, "block id") for b in _list(_get(item, "blocks"), "blocks"))
        if len(keys) != len(blocks):
            raise MetadataError("a save has as many keys as block ids")
        saves.append(SaveSpec(_str(_get(item, "req"), "req"), keys, blocks))
    return StepPlan(step, tuple(loads), tuple(saves))


@dataclass
class BelugaWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler: steps whose loads are finished (their pins can go), and the
    slots whose blocks failed validation (to be dropped from the pool)."""

    done_steps: set[int] = field(default_factory=set)
    bad_slots: set[int] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, BelugaWorkerMeta):
            raise MetadataError(f"cannot aggregate {type(other).__name__} into worker meta")
        return BelugaWorkerMeta(self.done_steps | other.done_steps,
                                self.bad_slots | other.bad_slots)

    def steps(self) -> set[int]:
        return {_int(s, "step") for s in self.done_steps}

    def bad(self) -> set[int]:
        return {_int(s, "slot") for s in self.bad_slots}


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else None


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MetadataError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise MetadataError(f"{what} must be a non-empty string")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MetadataError(f"{what} must be a list")
    return value


def _key(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != KEY_HEX:
        raise MetadataError("a block key is 64 hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MetadataError("a block key is 64 hex digits") from None
