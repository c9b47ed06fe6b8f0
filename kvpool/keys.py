"""Block keys: the one definition shared by the gateway and every worker (DESIGN.md).

A prompt's token ids are cut into blocks of `block_tokens`; only full blocks get keys.
    key[-1] = sha256("beluga-root-v1" || model fingerprint || cache salt [|| adapter])
    key[i]  = sha256(key[i-1] || namespace || token ids of block i as little-endian u32)
Each part is length-prefixed, so no two different inputs hash the same bytes. The adapter
part (a LoRA adapter's name and the digest of its files) is there only for requests served
with one, so a base-model block never has an adapter block's key, and keys of requests
without an adapter are what they were before adapters existed.

Everything else that decides a block's KV must be in the chain, or the request must not
touch the pool: `Identity` is what the chain can express. Multimodal inputs and prompt
embeddings it cannot (callers keep such requests away from the pool and count them).

`KeyChain` is the chain itself: fed token ids as they become known (resumable), hashing
nothing before it is asked to (lazy), and, given a `ChainMemo`, hashing a piece it has seen
from the same state (a system prompt, an earlier turn) only once (memoised). The gateway
keys prompts with it piece by piece; the engine extends each request's chain as its tokens
are computed; `block_keys` is a chain fed once.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as keys see it: its name and a digest of its files (adapter_digest).
    The same name pointing at other weights, on another worker or after a reload, keys
    differently."""

    name: str
    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != KEY_BYTES:
            raise ValueError(f"an adapter digest is {KEY_BYTES} bytes")


@dataclass(frozen=True)
class Identity:
    """Everything besides the tokens that decides a block's KV: the chain's root."""

    fingerprint: bytes
    cache_salt: str | bytes = b""
    adapter: Adapter | None = None

    def root(self) -> bytes:
        return root_key(self.fingerprint, self.cache_salt, self.adapter)


def _update(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def root_key(fingerprint: bytes, cache_salt: str | bytes = b"",
             adapter: Adapter | None = None) -> bytes:
    salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
    h = hashlib.sha256(b"beluga-root-v1")
    _update(h, fingerprint)
    _update(h, salt)
    if adapter is not None:
        _update(h, b"lora:" + adapter.name.encode())
        _update(h, adapter.digest)
    return h.digest()


def next_key(prev: bytes, block: Sequence[int], namespace: str | bytes = b"") -> bytes:
    """The key of a block given its predecessor's key (one step of the chain)."""
    ns = namespace.encode() if isinstance(namespace, str) else namespace
    h = hashlib.sha256(prev)
    _update(h, ns)
    try:
        h.update(struct.pack(f"<{len(block)}I", *block))
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2^32): {exc}") from None
    return h.digest()


MAX_MEMO_SALT = 256  # bytes of a cache salt whose root the memo keeps

# (key of the chain's last full block, block size, namespace, tokens fed since, the piece's
# identity)
MemoState = tuple[bytes, int, bytes, tuple[int, ...], str]
MemoResult = tuple[tuple[bytes, ...], tuple[int, ...]]  # (keys the piece completes, left over)


class ChainMemo:
    """What whole pieces (a system prompt, an earlier turn) made of a chain state: a prompt
    that comes back is hashed once, not on every request. Bounded by entries and by about
    the bytes held, least recently used out; also the roots per identity (not for salts
    longer than MAX_MEMO_SALT: a client's salt is its own, and may be megabytes)."""

    def __init__(self, entries: int = 512, roots: int = 1024,
                 max_bytes: int = 16 * 1024 * 1024) -> None:
        self._memo: OrderedDict[MemoState, MemoResult] = OrderedDict()
        self._roots: dict[Identity, bytes] = {}
        self._entries, self._max_roots = entries, roots
        self._max_bytes, self._bytes = max_bytes, 0

    def __len__(self) -> int:
        return len(self._memo)

    def root(self, identity: Identity) -> bytes:
        if len(identity.cache_salt) > MAX_MEMO_SALT:
            return identity.root()
        key = self._roots.get(identity)
        if key is None:
            if len(self._roots) >= self._max_roots:
                self._roots.clear()
            key = self._roots[identity] = identity.root()
        return key

    def get(self, state: MemoState) -> MemoResult | None:
        known = self._memo.get(state)
        if known is not None:
            self._memo.move_to_end(state)
        return known

    def put(self, state: MemoState, result: MemoResult) -> None:
        if state in self._memo:
            return
        self._memo[state] = result
        self._bytes += _memo_bytes(state, result)
        while self._memo and (len(self._memo) > self._entries
                              or self._bytes > self._max_bytes):
            old, old_result = self._memo.popitem(last=False)
            self._bytes -= _memo_bytes(old, old_result)


def _memo_bytes(state: MemoState, result: MemoResult) -> int:
    """About what one memo entry holds: the piece's text, ~70 bytes a key, ~40 an id."""
    return len(state[4]) + 70 * len(result[0]) + 40 * (len(state[3]) + len(result[1]))


class KeyChain:
    """The block keys of one token sequence, made as its tokens are fed.

    `extend` yields the keys a piece of tokens completes as it hashes them (a caller may
    stop reading early); `advance` keys a growing sequence up to a length, feeding only
    what it has not seen. A token id outside [0, 2^32) ends the chain: that call and every
    later one raise ValueError, and the keys made before it stay valid."""

    __slots__ = ("block_tokens", "namespace", "keys", "_last", "_pending", "_fed", "_broken")

    def __init__(self, root: bytes, block_tokens: int, namespace: str | bytes = b"") -> None:
        if block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        self.block_tokens = block_tokens
        self.namespace = namespace
        self.keys: list[bytes] = []
        self._last = root
        self._pending: list[int] = []  # fed tokens not yet making a full block
        self._fed = 0  # tokens fed so far
        self._broken: str | None = None

    @classmethod
    def of(cls, identity: Identity, block_tokens: int, memo: ChainMemo | None = None
           ) -> KeyChain:
        return cls(memo.root(identity) if memo is not None else identity.root(), block_tokens)

    @property
    def fed(self) -> int:
        return self._fed

    def extend(self, token_ids: Sequence[int], memo: ChainMemo | None = None,
               piece: str | None = None) -> Generator[bytes, None, None]:
        """Feed `token_ids`; yield each key they complete. With a memo and the piece's
        identity (its text), a piece already fed from the same state costs no hashing, and
        a piece read to its end is remembered."""
        if self._broken is not None:
            raise ValueError(self._broken)
        bt = self.block_tokens
        state: MemoState | None = None
        if memo is not None and piece is not None and len(token_ids) >= bt:
            ns = self.namespace.encode() if isinstance(self.namespace, str) else self.namespace
            state = (self._last, bt, ns, tuple(self._pending), piece)
            known = memo.get(state)
            if known is not None:
                keys, rest = known
                self.keys.extend(keys)
                if keys:
                    self._last = keys[-1]
                self._pending = list(rest)
                self._fed += len(token_ids)
                yield from keys
                return
        self._fed += len(token_ids)
        buf = self._pending
        buf.extend(token_ids)
        start = 0
        made: list[bytes] = []
        try:
            while len(buf) - start >= bt:
                try:
                    key = next_key(self._last, buf[start:start + bt], self.namespace)
                except ValueError as exc:
                    self._broken = str(exc)
                    raise
                start += bt
                self._last = key
                self.keys.append(key)
                made.append(key)
                yield key
        finally:
            del buf[:start]
        if state is not None and memo is not None:
            memo.put(state, (tuple(made), tuple(buf)))

    def feed(self, token_ids: Sequence[int], memo: ChainMemo | None = None,
             piece: str | None = None) -> list[bytes]:
        """`extend`, read to the end: the keys `token_ids` complete."""
        return list(self.extend(token_ids, memo, piece))

    def advance(self, token_ids: Sequence[int], upto: int) -> list[bytes]:
        """The keys of the full blocks within the first `upto` tokens of `token_ids`, a
        sequence that only grows (an engine request's tokens), feeding what is new."""
        want = min(upto, len(token_ids)) // self.block_tokens * self.block_tokens
        if want > self._fed:
            self.feed(token_ids[self._fed:want])
        elif len(self._pending) >= self.block_tokens:  # an extend read only part way
            self.feed(())
        return self.keys[:upto // self.block_tokens]


def block_keys(token_ids: Sequence[int], block_tokens: int, fingerprint: bytes,
               cache_salt: str | bytes = b"", namespace: str | bytes = b"",
               adapter: Adapter | None = None) -> list[bytes]:
    """Keys of the full blocks of `token_ids` (a trailing partial block has none)."""
    chain = KeyChain(root_key(fingerprint, cache_salt, adapter), block_tokens, namespace)
    return chain.feed(token_ids)


# -- adapters ------------------------------------------------------------------------------
ADAPTER_MAX_FILES = 64
_digests: dict[tuple[str, tuple[tuple[str, int, int], ...]], bytes] = {}


def adapter_signature(path: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, modification time) of each regular file in an adapter's folder, by
    name: what changes when the adapter's files are rewritten. Raises OSError for a folder
    that cannot be read, ValueError for one with too many files."""
    files = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            files.append((entry.name, st.st_size, st.st_mtime_ns))
    if len(files) > ADAPTER_MAX_FILES:
        raise ValueError(f"{path} holds {len(files)} files (an adapter has a few)")
    return tuple(files)


def adapter_digest(path: str | os.PathLike[str]) -> bytes:
    """A digest of a LoRA adapter's contents: the names, sizes and bytes of the regular
    files in its folder (adapter_config.json, the weights, ...), subfolders not included.
    Two copies of one adapter digest the same anywhere; any changed byte changes it.
    Remembered per folder while no file's size or modification time changes. Raises
    OSError for a folder that cannot be read, ValueError for one with too many files."""
    folder = Path(path)
    files = adapter_signature(folder)
    memo_key = (str(folder.resolve()), files)
    digest = _digests.get(memo_key)
    if digest is None:
        h = hashlib.sha256(b"beluga-adapter-v1")
        for name, _size, _mtime in files:
            _update(h, name.encode())
            with open(folder / name, "rb") as f:
                data = hashlib.file_digest(f, "sha256").digest()
            _update(h, data)
        digest = h.digest()
        if len(_digests) > 256:
            _digests.clear()
        _digests[memo_key] = digest
    return digest
