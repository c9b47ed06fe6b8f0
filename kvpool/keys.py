"""Block keys: the one definition shared by the gateway and every worker (DESIGN.md).

A prompt's token ids are cut into blocks of `block_tokens`; only full blocks get keys.
    key[-1] = sha256(model fingerprint || cache salt)
    key[i]  = sha256(key[i-1] || namespace || token ids of block i as little-endian u32)
Each part is length-prefixed, so no two different inputs hash the same bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

KEY_BYTES = 32


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two models' KV blocks interchangeable. Every field goes into the key."""

    name: str
    revision: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_tokens: int
    tp_rank: int = 0
    tp_size: int = 1

    def fingerprint(self) -> bytes:
        """32-byte digest of the identity (stored in the pool header)."""
        h = hashlib.sha256(b"beluga-model-v1")
        for part in (self.name, self.revision, self.dtype, self.num_layers, self.num_kv_heads,
                     self.head_size, self.block_tokens, self.tp_rank, self.tp_size):
            _update(h, str(part).encode())
        return h.digest()


def _update(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def root_key(fingerprint: bytes, cache_salt: str | bytes = b"") -> bytes:
    salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
    h = hashlib.sha256(b"beluga-root-v1")
    _update(h, fingerprint)
    _update(h, salt)
    return h.digest()


def next_key(prev: bytes, block: Sequence[int], namespace: str | bytes = b"") -> bytes:
    """The key of a block given its predecessor's key (the chain step of block_keys)."""
    ns = namespace.encode() if isinstance(namespace, str) else namespace
    h = hashlib.sha256(prev)
    _update(h, ns)
    try:
        h.update(struct.pack(f"<{len(block)}I", *block))
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2^32): {exc}") from None
    return h.digest()


def block_keys(token_ids: Sequence[int], block_tokens: int, fingerprint: bytes,
               cache_salt: str | bytes = b"", namespace: str | bytes = b"") -> list[bytes]:
    """Keys of the full blocks of `token_ids` (a trailing partial block has none)."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    prev = root_key(fingerprint, cache_salt)
    keys: list[bytes] = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        prev = next_key(prev, token_ids[start:start + block_tokens], namespace)
        keys.append(prev)
    return keys
