"""The worker registry record: what a worker publishes in Redis and the gateway reads.

One Redis string per worker, ``<prefix>:worker:<id>``, holding a JSON object with an explicit
``schema`` version and a TTL. Readers validate every record and skip ones they do not
understand; Redis holds routing hints only, never state that correctness depends on.
"""

from __future__ import annotations

import json
import logging

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class WorkerRecord(BaseModel):
    """One worker as the registry knows it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = Field(SCHEMA_VERSION, alias="schema")
    id: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1, max_length=500)
    model: str = Field(min_length=1, max_length=500)
    capacity: int = Field(ge=1)
    pid: int = Field(ge=0)
    started_at: float
    heartbeat_at: float
    running: int = Field(0, ge=0)
    waiting: int = Field(0, ge=0)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def worker_pattern(prefix: str) -> str:
    return f"{prefix}:worker:*"


def parse_record(raw: bytes | str) -> WorkerRecord | None:
    """Decode one registry value; None (and a debug log) for anything malformed or foreign."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            logger.debug("skipping registry record with unknown schema")
            return None
        return WorkerRecord.model_validate(data)
    except (ValueError, ValidationError):
        logger.debug("skipping malformed registry record")
        return None


# -- routing hints: which blocks a worker holds in its own KV cache ----------------------
HINTS_SCHEMA_VERSION = 1
HINT_KEY_HEX = 32  # the first 16 bytes of a block key: plenty for a routing hint


class HintsRecord(BaseModel):
    """What a worker publishes next to its block-key set: how to read that set."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = Field(HINTS_SCHEMA_VERSION, alias="schema")
    worker_id: str = Field(min_length=1, max_length=200)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")  # model fingerprint of the keys
    block_tokens: int = Field(ge=1)
    pool_uuid: str | None = None  # the pool this worker shares through, if any
    pool_path: str | None = Field(None, max_length=4096)  # where that pool is mapped there
    keys: int = Field(ge=0)  # how many keys the set holds
    updated_at: float

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def hints_key(prefix: str, worker_id: str) -> str:
    """JSON HintsRecord of one worker."""
    return f"{prefix}:hints:{worker_id}"


def hint_blocks_key(prefix: str, worker_id: str) -> str:
    """Redis set of hint keys (hex of the first 16 bytes of each block key)."""
    return f"{prefix}:hints:{worker_id}:blocks"


def hint_key(block_key: bytes) -> str:
    return block_key.hex()[:HINT_KEY_HEX]


def parse_hints(raw: bytes | str) -> HintsRecord | None:
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("schema") != HINTS_SCHEMA_VERSION:
            return None
        return HintsRecord.model_validate(data)
    except (ValueError, ValidationError):
        logger.debug("skipping malformed hints record")
        return None
