"""The pool lookup a gateway asks of a worker when the pool is not mapped on its own host.

A gateway routes on how many of a prompt's leading blocks the shared pool holds. On the
workers' host it attaches the pool and asks it directly (`KVPool.lookup_prefix`). Elsewhere
(a gateway on a host without the CXL device or the workers' /dev/shm) it asks a worker that
shares the pool, over HTTP on the worker's own port:

    POST /beluga/v1/pool/lookup
    {"version": 1, "pool_uuid": "<uuid>", "keys": ["<64 hex>", ...]}
    -> 200 {"version": 1, "pool_uuid": "<uuid>", "blocks": <leading keys the pool holds>}

Errors use the OpenAI error body: 400 (malformed), 404 (that pool is not this worker's),
405, 413 (more than MAX_KEYS keys or MAX_BODY_BYTES), 503 (the pool cannot be attached).
The worker side is engine/pool_lookup_endpoint.py, mounted in vLLM's API server.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

LOOKUP_PATH = "/beluga/v1/pool/lookup"
LOOKUP_VERSION = 1
MAX_KEYS = 8192  # a 131,072-token prompt in blocks of 16
MAX_BODY_BYTES = 64 + MAX_KEYS * 68 + 4096  # the keys as quoted hex, commas and the rest

HexKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    pool_uuid: str
    keys: list[HexKey] = Field(max_length=MAX_KEYS)

    @field_validator("pool_uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return str(uuidlib.UUID(value))  # ValueError -> a validation error

    def block_keys(self) -> list[bytes]:
        return [bytes.fromhex(k) for k in self.keys]


class LookupReply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal[1]
    pool_uuid: str
    blocks: int = Field(ge=0)


def request_body(pool_uuid: str, keys: list[bytes]) -> bytes:
    """A LookupRequest's JSON (written directly: it is on the gateway's routing path)."""
    return json.dumps({"version": LOOKUP_VERSION, "pool_uuid": pool_uuid,
                       "keys": [k.hex() for k in keys]}).encode()
