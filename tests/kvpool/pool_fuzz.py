"""Fuzzing the pool file (issue 17): random bytes over every region of a live pool while other
processes operate on it, checking that nothing crashes, hangs, returns a wrong block or
raises an untyped exception.

The harness runs in epochs. One epoch (`run_epoch`):

* creates a small pool in /dev/shm under a unique name (removed afterwards, even on failure);
* starts `procs` operator processes (`python -m tests.kvpool.pool_fuzz worker ...`), each with
  its own seed derived from the epoch's, doing random operations through the public
  `kvpool.KVPool` API: put, get, lookup_prefix, pin + read + unpin, pin + scatter(verify) +
  unpin, prepare_store + gather + complete_store (ok or abort), remove, sweep, stats,
  close + re-attach, calls with out-of-range arguments, and now and then an abrupt exit
  (holding pins or half-written slots). Block content is a pure function of the key
  (`content`), so every reader checks every block it gets;
* scribbles from the parent (pwrite on its own descriptor) at a seeded rate, over every
  region: the header (magic, the checksummed identity and geometry, with or without a
  recomputed checksum, the checksum itself), the lock word, the mutable line, the
  statistics, the client table, the pin tables, the index, the slot metadata (key, state,
  owner, pins, ref, length, checksum) and the data, plus anywhere at all. Values are random
  bytes, bit flips, floods, or values chosen to look plausible (a bound, one past it, a
  live process's pid or lock token, another slot's key or checksum);
* SIGKILLs operators (and SIGSTOPs them for a moment) at seeded times; a seat whose
  process ended gets a new one (the next generation of that seat's seed);
* when the epoch's time is up: scribbling stops, operators are told to stop, and a fresh
  process attaches, sweeps, puts and gets ("recovery"); a typed refusal is acceptable.

Findings, counted per class:

    crash   a process died of a signal nobody sent it (SIGSEGV, SIGBUS, SIGABRT, ...)
    hang    a call ran past its bound (lock timeout x the locks it may take + a margin);
            faulthandler dumps its stack and ends it
    wrong   get or scatter(verify=True) returned a block whose bytes differ from what its
            key's writer stored
    escape  an exception that is not a kvpool.PoolError

and, reported but not failures: typed errors per operation and type, out-of-contract
return values ("invalid"), raw reads (pin + read, unverified) that differ from the content,
attach refusals, and how recovery ended (usable / degraded / refused:<error>).

Deterministic for a seed: which operations each operator draws, which scribbles the
scribbler draws (region, field, offset, bytes) and which signals the parent sends, in
order. Timing (which interleaving actually happens) is not; the assertions (no crash, hang,
wrong block or escape) must hold for every interleaving.

    python -m tests.kvpool.pool_fuzz plan SEED [N]   the first N draws of an epoch seed
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import hashlib
import inspect
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FP = hashlib.sha256(b"pool-fuzz-model").digest()
EXIT_ABRUPT = 77      # an operator's drawn abrupt exit (os._exit, no close)
EXIT_REFUSED = 78     # an operator could not attach (typed refusals only)
EXIT_HARNESS = 79     # the harness itself failed in an operator (a bug here, not in the pool)
FAULTHANDLER_EXIT = 1  # faulthandler.dump_traceback_later(exit=True)
CLASSES = ("crash", "hang", "wrong", "escape")
MAX_DETAILS = 12      # findings kept with details, per class and epoch

# ---------------------------------------------------------------------------------------
# Seeds and content
# ---------------------------------------------------------------------------------------


def derive(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from `seed` and `parts` (stable across processes and runs)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@lru_cache(maxsize=4096)
def fuzz_key(i: int) -> bytes:
    return hashlib.sha256(b"pool-fuzz-key-%d" % i).digest()


@lru_cache(maxsize=1024)
def content(key: bytes, slot_size: int) -> bytes:
    """The block stored under `key`: its length (slot_size minus 0..7 cache lines) and its
    bytes derive from the key alone, so a reader checks any block against any key."""
    n = slot_size - 64 * (key[0] % 8)
    return hashlib.shake_256(b"pool-fuzz-content" + key).digest(max(n, 1))


# ---------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------


@dataclass
class FuzzConfig:
    seed: int = 1717
    procs: int = 3
    epoch_s: float = 10.0          # operating + scribbling time per epoch
    warmup_s: float = 1.0          # operators fill the pool before the first scribble
    slot_size: int = 4096
    slot_count: int = 96
    max_clients: int = 8
    max_pins: int = 64
    keyspace: int = 192            # keys drawn from; > slot_count, so CLOCK evicts
    scribble_hz: float = 8.0       # mean scribbles per second
    kill_hz: float = 0.3           # mean SIGKILL / SIGSTOP events per second
    regions: tuple[str, ...] = ()  # scribble only these regions (empty: all)
    header_share: float = 0.5      # epochs whose header scribbles stay (not healed) ...
    header_tail: float = 0.3       # ... in this last part of their time
    lock_timeout_s: float = 5.0    # the native lock timeout (passed where the API takes it)
    margin_s: float = 8.0          # added to every call's bound (2 busy cores)
    mem_limit_mb: int = 768        # RLIMIT_AS of each operator
    badargs: bool = True           # operators also call with out-of-range arguments
    keep_dir: str = ""             # keep the epoch's work files here (debugging)


_COUNTERS = ("ops", "errors", "classes", "invalid", "info", "scribbles", "signals", "exits",
             "recovery")


@dataclass
class Tally:
    """Counts of one epoch (or of a whole run, merged)."""

    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)      # "op PoolErrorType"
    classes: Counter[str] = field(default_factory=Counter)     # crash/hang/wrong/escape
    invalid: Counter[str] = field(default_factory=Counter)     # out-of-contract returns
    info: Counter[str] = field(default_factory=Counter)        # raw mismatches, refusals...
    scribbles: Counter[str] = field(default_factory=Counter)   # "region.what"
    signals: Counter[str] = field(default_factory=Counter)     # sent by the parent
    exits: Counter[str] = field(default_factory=Counter)       # how operators ended
    recovery: Counter[str] = field(default_factory=Counter)
    max_s: dict[str, float] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        for name in _COUNTERS:
            getattr(self, name).update(getattr(other, name))
        for op, s in other.max_s.items():
            self.max_s[op] = max(self.max_s.get(op, 0.0), s)
        self.findings.extend(other.findings)

    def add_finding(self, cls: str, detail: dict[str, Any]) -> None:
        self.classes[cls] += 1
        if sum(1 for f in self.findings if f["class"] == cls) < MAX_DETAILS:
            self.findings.append({"class": cls, "at": time.time(), **detail})

    def failures(self) -> int:
        return sum(self.classes[c] for c in CLASSES)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: dict(getattr(self, name)) for name in _COUNTERS}
        out["findings"] = list(self.findings)
        out["classes"] = {c: self.classes[c] for c in CLASSES} | dict(self.classes)
        out["max_s"] = {k: round(v, 3) for k, v in sorted(self.max_s.items())}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Tally:
        t = cls()
        for name in _COUNTERS:
            getattr(t, name).update(d.get(name, {}))
        t.max_s = dict(d.get("max_s", {}))
        t.findings = list(d.get("findings", []))
        return t


# ---------------------------------------------------------------------------------------
# The file's layout (native/include/beluga/layout.h), read from the header with struct
# ---------------------------------------------------------------------------------------

# (offset, bytes) of the header's fields; the checksummed part is [8, 160).
HEADER_FIELDS: dict[str, tuple[int, int]] = {
    "magic": (0, 8), "version": (8, 4), "header_bytes": (12, 4), "total_bytes": (16, 8),
    "slot_size": (24, 8), "slot_count": (32, 8), "index_capacity": (40, 8),
    "max_clients": (48, 4), "max_pins": (52, 4), "coherence": (56, 4), "lease_ms": (60, 4),
    "clients_offset": (64, 8), "pins_offset": (72, 8), "index_offset": (80, 8),
    "slots_offset": (88, 8), "data_offset": (96, 8), "created_unix_ns": (104, 8),
    "fingerprint": (112, 32), "uuid": (144, 16), "header_checksum": (160, 8),
}
CHECKSUM_BEGIN, CHECKSUM_END = 8, 160
LOCK_WORD = 256
MUTABLE_FIELDS = {"clock_hand": (320, 8), "used_slots": (328, 8), "generation": (336, 8),
                  "flags": (344, 4)}
STATS = (384, 128)
# Client entry fields per format version (64 bytes each).
CLIENT_FIELDS = {
    2: {"active": (0, 4), "pid": (4, 4), "start_ticks": (8, 8), "pidns": (16, 8),
        "last_seen_ns": (24, 8), "npins": (32, 4), "attach_generation": (40, 8)},
    3: {"state": (0, 8), "pid": (8, 4), "nonce": (12, 4), "start_ticks": (16, 8),
        "pidns": (24, 8), "host": (32, 8), "last_seen_ns": (40, 8), "npins": (48, 4)},
}
SLOT_FIELDS = {"key": (0, 32), "state": (32, 4), "owner": (36, 4), "pins": (40, 4),
               "ref": (44, 4), "length": (48, 8), "checksum": (56, 4), "owner_nonce": (60, 4)}
REGIONS = ("magic", "geometry", "geometry+sum", "header_sum", "lock", "mutable", "stats",
           "clients", "pins", "index", "slots", "data", "anywhere")
# Scribbles here make every later attach refuse the file: an epoch heals them after a
# moment, except in the last header_tail of its time in header_share of the epochs.
HEADER_REGIONS = ("magic", "geometry", "geometry+sum", "header_sum")
REGION_WEIGHTS = {"magic": 2, "geometry": 5, "geometry+sum": 5, "header_sum": 2, "lock": 6,
                  "mutable": 8, "stats": 3, "clients": 12, "pins": 10, "index": 12,
                  "slots": 20, "data": 14, "anywhere": 3}
DEAD_PID = 4_194_000  # above the default pid_max on most hosts: kill() says ESRCH


def fnv1a64(data: bytes) -> int:
    x = 1469598103934665603
    for b in data:
        x = ((x ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return x


@dataclass(frozen=True)
class Geometry:
    """Where the regions are, read once from the header right after create (never from a
    scribbled header)."""

    size: int
    version: int
    slot_size: int
    slot_count: int
    index_capacity: int
    max_clients: int
    max_pins: int
    clients: int
    pins: int
    index: int
    slots: int
    data: int

    @classmethod
    def read(cls, path: str | Path) -> Geometry:
        with open(path, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size

        def get(name: str) -> int:
            off, n = HEADER_FIELDS[name]
            return int(struct.unpack_from("<I" if n == 4 else "<Q", head, off)[0])

        g = cls(size=size, version=get("version"), slot_size=get("slot_size"),
                slot_count=get("slot_count"), index_capacity=get("index_capacity"),
                max_clients=get("max_clients"), max_pins=get("max_pins"),
                clients=get("clients_offset"), pins=get("pins_offset"),
                index=get("index_offset"), slots=get("slots_offset"), data=get("data_offset"))
        if g.version not in CLIENT_FIELDS:
            raise RuntimeError(f"pool format {g.version}: teach pool_fuzz its layout")
        if not (g.clients < g.pins <= g.index < g.slots < g.data < g.size):
            raise RuntimeError(f"unexpected layout {g}")
        return g

    def region(self, name: str) -> tuple[int, int]:
        """(offset, bytes) of a region."""
        return {
            "magic": (0, 8), "geometry": (CHECKSUM_BEGIN, CHECKSUM_END - CHECKSUM_BEGIN),
            "geometry+sum": (CHECKSUM_BEGIN, CHECKSUM_END - CHECKSUM_BEGIN),
            "header_sum": (160, 8), "lock": (LOCK_WORD, 8), "mutable": (320, 64),
            "stats": STATS, "clients": (self.clients, self.max_clients * 64),
            "pins": (self.pins, self.max_clients * self.max_pins * 4),
            "index": (self.index, self.index_capacity * 4),
            "slots": (self.slots, self.slot_count * 64),
            "data": (self.data, self.slot_count * self.slot_size),
            "anywhere": (0, self.size),
        }[name]


# ---------------------------------------------------------------------------------------
# Scribbles: drawn deterministically, applied with pwrite
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scribble:
    """One write over the file. `how`: "write" (data), "xor" (data is the mask), "copy"
    (arg: source offset), "token" (arg: (seat, client index): the lock word or a pid field
    gets a live operator's pid / token), "resum" (write data, then recompute the header
    checksum so attach accepts the header)."""

    label: str   # region.what, for the counts
    offset: int
    data: bytes
    how: str = "write"
    arg: tuple[int, ...] = ()

    def brief(self) -> dict[str, Any]:
        return {"label": self.label, "offset": self.offset, "bytes": len(self.data),
                "how": self.how, "arg": list(self.arg), "data": self.data[:16].hex()}


def _interesting(rng: random.Random, width: int, bound: int) -> int:
    """A value for a numeric field of `width` bytes whose valid range ends at `bound`."""
    top = (1 << (8 * width)) - 1
    choices = [0, 1, 2, bound - 1, bound, bound + 1, 2 * bound, bound << 16, 1 << 31,
               (1 << 32) - 1, 1 << 63, top, top - 1, rng.getrandbits(8 * width)]
    return rng.choice(choices) & top


def _random_len(rng: random.Random, room: int) -> int:
    r = rng.random()
    n = rng.choice((1, 2, 4, 8)) if r < 0.5 else (rng.randint(1, 64) if r < 0.85
                                                     else rng.randint(1, 4096))
    return max(1, min(n, room))


def draw_scribble(rng: random.Random, g: Geometry, regions: Sequence[str] = (),
                  seats: int = 1, header: bool = True) -> Scribble:
    """The next scribble; every value comes from `rng` (the bytes a "copy", "xor", "token"
    or "resum" writes depend on the file or the processes at that moment). `header`: also
    the regions that make attach refuse the file (magic, geometry, header checksum)."""
    names = [r for r in REGIONS if (not regions or r in regions)
             and (header or r not in HEADER_REGIONS)] or ["data"]
    region = rng.choices(names, weights=[REGION_WEIGHTS[r] for r in names])[0]
    base, size = g.region(region)
    style = rng.random()
    # Generic styles, any region: random bytes, a bit flip, a flood.
    if style < 0.25 or region in ("anywhere", "stats"):
        off = rng.randrange(size)
        n = _random_len(rng, size - off)
        return Scribble(f"{region}.random", base + off, rng.randbytes(n))
    if style < 0.35:
        off = rng.randrange(size)
        return Scribble(f"{region}.bitflip", base + off, bytes([1 << rng.randrange(8)]), "xor")
    if style < 0.40:
        off = rng.randrange(size)
        n = min(size - off, rng.choice((64, 512, 4096, 65536)))
        fill = rng.choice((b"\x00", b"\xff", b"\x01", None))
        data = rng.randbytes(n) if fill is None else fill * n
        return Scribble(f"{region}.flood", base + off, data)
    # Field-aware values.
    if region in ("geometry", "geometry+sum"):
        name = rng.choice([n for n, (o, _) in HEADER_FIELDS.items()
                           if CHECKSUM_BEGIN <= o < CHECKSUM_END])
        off, width = HEADER_FIELDS[name]
        if width > 8:
            data = rng.randbytes(width)
        else:
            nominal = {"slot_size": g.slot_size, "slot_count": g.slot_count,
                       "index_capacity": g.index_capacity, "max_clients": g.max_clients,
                       "max_pins": g.max_pins, "total_bytes": g.size, "version": g.version,
                       "header_bytes": 4096, "coherence": 2, "clients_offset": g.clients,
                       "pins_offset": g.pins, "index_offset": g.index,
                       "slots_offset": g.slots, "data_offset": g.data}.get(name, 1 << 20)
            data = _interesting(rng, width, nominal).to_bytes(width, "little")
        how = "resum" if region == "geometry+sum" else "write"
        return Scribble(f"{region}.{name}", off, data, how)
    if region == "magic":
        return Scribble("magic.value", 0, rng.choice(
            (b"\0" * 8, rng.randbytes(8), b"BELUGAKW")))
    if region == "header_sum":
        return Scribble("header_sum.value", 160, rng.randbytes(8))
    if region == "lock":
        kind = rng.choice(("zero", "random", "live", "dead", "parent", "no-client"))
        client = rng.randrange(g.max_clients + 2)
        seat = rng.randrange(max(seats, 1))
        if kind == "zero":
            return Scribble("lock.zero", LOCK_WORD, b"\0" * 8)
        if kind == "random":
            return Scribble("lock.random", LOCK_WORD, rng.randbytes(8))
        if kind == "dead":
            token = ((client + 1) << 32) | (DEAD_PID + rng.randrange(100))
            return Scribble("lock.dead", LOCK_WORD, token.to_bytes(8, "little"))
        if kind == "parent":  # a token naming no client and a live pid (this process)
            return Scribble("lock.parent", LOCK_WORD, b"", "token", (-1, 0))
        if kind == "no-client":  # a live operator's pid, no client
            return Scribble("lock.no-client", LOCK_WORD, b"", "token", (seat, 0))
        if g.version >= 3:  # a token as its holder would write it: client + 1, its nonce
            nonce_at = g.clients + 64 * min(client, g.max_clients - 1) + 12
            return Scribble("lock.live", LOCK_WORD, b"", "nonce-token", (nonce_at, client + 1))
        return Scribble("lock.live", LOCK_WORD, b"", "token", (seat, client + 1))
    if region == "mutable":
        name = rng.choice(list(MUTABLE_FIELDS))
        off, width = MUTABLE_FIELDS[name]
        value = _interesting(rng, width, g.slot_count)
        return Scribble(f"mutable.{name}", off, value.to_bytes(width, "little"))
    if region == "clients":
        fields = CLIENT_FIELDS[g.version]
        c = rng.randrange(g.max_clients)
        name = rng.choice(list(fields))
        off, width = fields[name]
        at = g.clients + 64 * c + off
        if name == "pid" and rng.random() < 0.5:
            return Scribble("clients.pid-live", at, b"", "token",
                            (rng.randrange(max(seats, 1)), -1))
        if name in ("state", "nonce", "host", "pidns", "start_ticks") and rng.random() < 0.4:
            # another entry's value: a plausible identity, state or nonce
            src = g.clients + 64 * rng.randrange(g.max_clients) + off
            return Scribble(f"clients.{name}-copy", at, b"\0" * width, "copy", (src,))
        bound = {"npins": g.max_pins, "active": 1, "state": 3}.get(name, 1 << 20)
        return Scribble(f"clients.{name}", at,
                        _interesting(rng, width, bound).to_bytes(width, "little"))
    if region == "pins":
        c, i = rng.randrange(g.max_clients), rng.randrange(g.max_pins)
        value = (rng.randrange(g.slot_count) + 1 if rng.random() < 0.4
                 else _interesting(rng, 4, g.slot_count))
        return Scribble("pins.entry", g.pins + 4 * (c * g.max_pins + i),
                        value.to_bytes(4, "little"))
    if region == "index":
        b = rng.randrange(g.index_capacity)
        r = rng.random()
        if r < 0.4:
            value = rng.randrange(g.slot_count) + 1  # a valid-looking slot
        elif r < 0.5:
            value = 0xFFFFFFFF
        else:
            value = _interesting(rng, 4, g.slot_count)
        return Scribble("index.bucket", g.index + 4 * b, value.to_bytes(4, "little"))
    if region == "slots":
        s = rng.randrange(g.slot_count)
        name = rng.choice(list(SLOT_FIELDS))
        off, width = SLOT_FIELDS[name]
        at = g.slots + 64 * s + off
        other = g.slots + 64 * rng.randrange(g.slot_count) + off
        if name == "key":
            r = rng.random()
            if r < 0.4:
                return Scribble("slots.key-copy", at, b"\0" * 32, "copy", (other,))
            if r < 0.7:
                return Scribble("slots.key-known", at, fuzz_key(rng.randrange(1 << 16)))
            off2 = rng.randrange(32)
            return Scribble("slots.key-random", at + off2, rng.randbytes(rng.randint(1, 32 - off2)))
        if name == "checksum" and rng.random() < 0.4:
            return Scribble("slots.checksum-copy", at, b"\0" * 4, "copy", (other,))
        if name in ("owner", "owner_nonce") and rng.random() < 0.4 and g.version >= 3:
            # a live client's index / nonce: the slot looks written by that client
            c = rng.randrange(g.max_clients)
            if name == "owner":
                return Scribble("slots.owner-client", at, c.to_bytes(4, "little"))
            return Scribble("slots.owner_nonce-copy", at, b"\0" * 4, "copy",
                            (g.clients + 64 * c + 12,))
        if name == "state" and rng.random() < 0.4:  # publish whatever the slot holds
            return Scribble("slots.state-ready", at, (2).to_bytes(4, "little"))
        bound = {"state": 3, "owner": g.max_clients, "pins": 1, "ref": 1,
                 "length": g.slot_size}.get(name, 1 << 20)
        return Scribble(f"slots.{name}", at,
                        _interesting(rng, width, bound).to_bytes(width, "little"))
    # data: part of one slot's bytes
    s = rng.randrange(g.slot_count)
    off = rng.randrange(g.slot_size)
    n = _random_len(rng, g.slot_size - off)
    at = g.data + s * g.slot_size + off
    r = rng.random()
    if r < 0.2:
        src = g.data + rng.randrange(g.slot_count) * g.slot_size + off
        return Scribble("data.copy", at, b"\0" * n, "copy", (src,))
    if r < 0.3:
        return Scribble("data.zero", at, b"\0" * n)
    return Scribble("data.random", at, rng.randbytes(n))


def apply_scribble(fd: int, sc: Scribble, seat_pids: Callable[[int], int | None]) -> bytes:
    """Write one scribble through `fd`; returns the bytes written."""
    data = sc.data
    if sc.how == "xor":
        old = os.pread(fd, len(data), sc.offset)
        data = bytes(a ^ b for a, b in zip(old, data, strict=False))
    elif sc.how == "copy":
        data = os.pread(fd, len(sc.data), sc.arg[0])
    elif sc.how == "token":  # arg (seat, high): a live pid; high < 0: the pid alone
        seat, high = sc.arg
        pid = os.getpid() if seat < 0 else (seat_pids(seat) or os.getpid())
        data = (pid.to_bytes(4, "little") if high < 0
                else ((high << 32) | pid).to_bytes(8, "little"))
    elif sc.how == "nonce-token":  # arg (offset of a client's nonce, high)
        nonce = int.from_bytes(os.pread(fd, 4, sc.arg[0]), "little")
        data = ((sc.arg[1] << 32) | nonce).to_bytes(8, "little")
    os.pwrite(fd, data, sc.offset)
    if sc.how == "resum":
        body = os.pread(fd, CHECKSUM_END - CHECKSUM_BEGIN, CHECKSUM_BEGIN)
        os.pwrite(fd, fnv1a64(body).to_bytes(8, "little"), CHECKSUM_END)
    return data


# ---------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------

OP_WEIGHTS = {"put": 18, "get": 18, "pin_scatter": 10, "pin_read": 6, "gather_store": 8,
              "write_store": 4,
              "lookup": 10, "remove": 5, "sweep": 3, "stats": 4, "reattach": 2, "badarg": 3,
              "abrupt": 0.08}
# Lock acquisitions an operation may make (each may wait up to the lock timeout).
OP_LOCKS = {"put": 3, "get": 2, "pin_scatter": 2, "pin_read": 2, "gather_store": 3,
            "write_store": 3,
            "lookup": 1, "remove": 1, "sweep": 1, "stats": 1, "reattach": 2, "badarg": 3,
            "abrupt": 3, "attach": 1, "close": 1}
WAIT_INIT_S = 1.0
NATIVE_LOCK_TIMEOUT_S = 5.0  # where attach/create take no lock_timeout_s


# Calls with arguments out of range (issue 17's PoolArgumentError list): each must raise a
# PoolError; one that returns is counted as "invalid" (reported, not a failure here).
BADARGS = ("read offset 2**64-1", "read past the slot", "slot_length(2**40)",
           "slot_length(-1)", "unpin(2**32 + slot)", "scatter segments summing past 2**64",
           "scatter block_id*stride past 2**64", "complete_store(2**40)",
           "gather into an unreserved slot")


@dataclass(frozen=True)
class Op:
    kind: str
    start: int
    n: int
    u: float   # abort / variant draws
    sub: int
    threads: int


def draw_op(rng: random.Random, keyspace: int, badargs: bool = True) -> Op:
    """Every op draws the same number of values, so the sequence never depends on results."""
    kinds = [k for k in OP_WEIGHTS if badargs or k != "badarg"]
    kind = rng.choices(kinds, weights=[OP_WEIGHTS[k] for k in kinds])[0]
    return Op(kind, rng.randrange(keyspace), rng.randint(1, 6), rng.random(),
              rng.randrange(1 << 16), rng.choice((1, 2)))


def op_bound(cfg_lock_timeout: float, margin: float, kind: str) -> float:
    extra = WAIT_INIT_S if kind in ("reattach", "attach") else 0.0
    return cfg_lock_timeout * OP_LOCKS[kind] + margin + extra


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _reserved_slot(r: Any) -> int:
    """The slot one prepare_store entry reserved, or -1 (the old API returns ints, negative
    for DUPLICATE / FULL; the new one Reservation(outcome, slot))."""
    if isinstance(r, int):
        return r
    outcome = getattr(r, "outcome", None)
    name = str(getattr(outcome, "name", outcome)).upper()
    slot = getattr(r, "slot", -1)
    return int(slot) if name in ("OK", "RESERVED", "STORED") and slot is not None else -1


class Operator:
    """One operator process: draws ops from its seed, runs each under a watchdog, counts."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import kvpool

        self.kv = kvpool
        self.spec = spec
        self.path: str = spec["path"]
        self.slot_size: int = spec["slot_size"]
        self.slot_count: int = spec["slot_count"]
        self.keyspace: int = spec["keyspace"]
        self.lock_timeout: float = spec["lock_timeout_s"]
        self.margin: float = spec["margin_s"]
        self.rng = random.Random(spec["seed"])
        self.tally = Tally()
        self.pool: Any = None
        self.stop = Path(spec["stop"])
        self.result = Path(spec["result"])
        self.hang_file = open(spec["hang"], "w")  # noqa: SIM115 (kept open for faulthandler)
        self.last_flush = 0.0
        self.watchdog: bool = spec.get("watchdog", True)
        self.attach_kwargs: dict[str, Any] = {"fingerprint": FP, "wait_init_s": WAIT_INIT_S}
        if _accepts(kvpool.KVPool.attach, "lock_timeout_s"):
            self.attach_kwargs["lock_timeout_s"] = self.lock_timeout

    # -- bookkeeping ---------------------------------------------------------------------
    def flush(self, exit_kind: str | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_flush < 0.5:
            return
        self.last_flush = now
        out = self.tally.to_json()
        out["exit"] = exit_kind
        out["pid"] = os.getpid()
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, self.result)

    @contextlib.contextmanager
    def bounded(self, kind: str) -> Iterator[None]:
        """Run one op under faulthandler's watchdog (it dumps every thread's stack and
        exits with status 1 past the bound); count typed errors and escapes."""
        bound = op_bound(self.lock_timeout, self.margin, kind)
        if self.watchdog:
            faulthandler.dump_traceback_later(bound, exit=True, file=self.hang_file)
        t0 = time.monotonic()
        self.tally.ops[kind] += 1
        try:
            yield
        except self.kv.PoolError as exc:
            self.tally.errors[f"{kind} {type(exc).__name__}"] += 1
        except Exception as exc:  # noqa: BLE001 - an untyped exception is a finding
            self.tally.add_finding("escape", {
                "op": kind, "type": f"{type(exc).__module__}.{type(exc).__name__}",
                "message": str(exc)[:300], "seed": self.spec["seed"],
                "traceback": traceback.format_exc(limit=6)[-1500:]})
            self.flush(force=True)
        finally:
            if self.watchdog:
                faulthandler.cancel_dump_traceback_later()
            dt = time.monotonic() - t0
            self.tally.max_s[kind] = max(self.tally.max_s.get(kind, 0.0), dt)

    def wrong(self, op: str, key_index: int, pos: int, want: bytes, got: bytes,
              slot: int | None = None) -> None:
        diff = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                    min(len(want), len(got)))
        self.tally.add_finding("wrong", {
            "op": op, "key_index": key_index, "position": pos, "slot": slot,
            "want_len": len(want), "got_len": len(got), "first_diff": diff,
            "seed": self.spec["seed"]})
        self.flush(force=True)

    def invalid(self, what: str) -> None:
        self.tally.invalid[what] += 1

    # -- attach / close ------------------------------------------------------------------
    def attach(self) -> bool:
        for _ in range(20):
            if self.stop.exists():
                return False
            with self.bounded("attach"):
                self.pool = self.kv.KVPool.attach(self.path, **self.attach_kwargs)
                return True
            self.tally.info["attach refused"] += 1
            time.sleep(0.05)
        return False

    def close(self) -> None:
        if self.pool is not None:
            with self.bounded("close"):
                self.pool.close()
            self.pool = None

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        if not self.attach():
            return self.finish_unattached()
        while not self.stop.exists():
            op = draw_op(self.rng, self.keyspace, self.spec["badargs"])
            if op.kind == "abrupt":
                self.abrupt(op)  # does not return
            if self.pool is None and not self.attach():
                return self.finish_unattached()
            with self.bounded(op.kind):
                getattr(self, f"op_{op.kind}")(op)
            self.flush()
        self.close()
        self.flush("stop", force=True)
        return 0

    def finish_unattached(self) -> int:
        if self.stop.exists():
            self.flush("stop", force=True)
            return 0
        self.flush("refused", force=True)
        return EXIT_REFUSED

    def keys(self, op: Op) -> tuple[list[int], list[bytes]]:
        idx = [(op.start + j) % self.keyspace for j in range(op.n)]
        return idx, [fuzz_key(i) for i in idx]

    def pinned_pairs(self, slots: Sequence[int], keys: list[bytes]) -> list[
            tuple[int, bytes, int]]:
        """(position, key, slot) of what pin returned (the pinned prefix of `keys`, in
        order); a slot out of range or past the keys is counted as invalid and skipped."""
        if len(slots) > len(keys):
            self.invalid("pin: more slots than keys")
        out = []
        for pos, (k, s) in enumerate(zip(keys, slots, strict=False)):
            if isinstance(s, int) and 0 <= s < self.slot_count:
                out.append((pos, k, s))
            else:
                self.invalid("pin: slot out of range")
        return out

    # -- operations (each runs inside bounded) -------------------------------------------
    def op_put(self, op: Op) -> None:
        _, keys = self.keys(op)
        self.pool.put(keys, [content(k, self.slot_size) for k in keys])

    def op_get(self, op: Op) -> None:
        idx, keys = self.keys(op)
        blocks = self.pool.get(keys)
        if len(blocks) > len(keys):
            self.invalid("get: more blocks than keys")
        for pos, (i, k, b) in enumerate(zip(idx, keys, blocks, strict=False)):
            want = content(k, self.slot_size)
            if bytes(b) != want:
                self.wrong("get", i, pos, want, bytes(b))

    def op_lookup(self, op: Op) -> None:
        _, keys = self.keys(op)
        n = self.pool.lookup_prefix(keys)
        if not 0 <= n <= len(keys):
            self.invalid("lookup_prefix: out of range")

    def op_pin_read(self, op: Op) -> None:
        """pin + read + unpin: the raw path (unverified; a scribbled block may come back,
        counted as information)."""
        _, keys = self.keys(op)
        slots = list(self.pool.pin(keys))
        try:
            for _pos, k, s in self.pinned_pairs(slots, keys):
                n = self.pool.slot_length(s)
                if not 0 <= n <= self.slot_size:
                    self.invalid("slot_length: beyond the slot")
                    continue
                buf = bytearray(n)
                self.pool.read(s, buf)
                if bytes(buf) != content(k, self.slot_size):
                    self.tally.info["raw read differs (unverified path)"] += 1
        finally:
            self.pool.unpin(slots)

    def op_pin_scatter(self, op: Op) -> None:
        """pin + scatter(verify=True) into this process's memory + unpin: a block that
        passes verification must be its key's content."""
        idx, keys = self.keys(op)
        slots = list(self.pool.pin(keys))
        try:
            for pos, k, s in self.pinned_pairs(slots, keys):
                n = self.pool.slot_length(s)
                if not 0 < n <= self.slot_size:
                    if n != 0:
                        self.invalid("slot_length: beyond the slot")
                    continue
                buf = (ctypes.c_char * n)()
                failed = self.pool.scatter([s], [0], [(ctypes.addressof(buf), n, n)],
                                           threads=op.threads, verify=True)
                if failed:
                    self.tally.info["scatter verification failed"] += 1
                    continue
                want = content(k, self.slot_size)
                if bytes(buf) != want:
                    self.wrong("pin_scatter", idx[pos], pos, want, bytes(buf), s)
        finally:
            self.pool.unpin(slots)

    def op_gather_store(self, op: Op) -> None:
        """prepare_store + gather from this process's memory + complete_store (ok, or
        abort when op.u < 0.2)."""
        _, keys = self.keys(op)
        res = self.pool.prepare_store(keys)
        slots = [_reserved_slot(r) for r in res]
        mine = [(s, k) for s, k in zip(slots, keys, strict=False) if s >= 0]
        if any(s >= self.slot_count for s, _ in mine):
            self.invalid("prepare_store: slot out of range")
        done: list[int] = []
        lengths: list[int] = []
        sums: list[int] = []
        try:
            if op.u >= 0.2:
                for s, k in mine:
                    data = content(k, self.slot_size)
                    src = ctypes.create_string_buffer(data, len(data))
                    sums += self.pool.gather([s], [0], [(ctypes.addressof(src), len(data),
                                                         len(data))], threads=op.threads)
                    done.append(s)
                    lengths.append(len(data))
        except BaseException:
            self.pool.complete_store([s for s, _ in mine], ok=False)
            raise
        if op.u < 0.2:
            self.pool.complete_store([s for s, _ in mine], ok=False)
        else:
            self.pool.complete_store(done, lengths, checksums=sums)

    def op_write_store(self, op: Op) -> None:
        """prepare_store + write + complete_store, passing the checksums write returned
        (op.u < 0.5), or none (the pool then computes them from the slots)."""
        _, keys = self.keys(op)
        mine = [(s, k) for s, k in ((_reserved_slot(r), k) for r, k in
                                    zip(self.pool.prepare_store(keys), keys, strict=False))
                if s >= 0]
        slots: list[int] = []
        lengths: list[int] = []
        sums: list[int] = []
        try:
            for s, k in mine:
                data = content(k, self.slot_size)
                sums.append(self.pool.write(s, data))
                slots.append(s)
                lengths.append(len(data))
        except BaseException:
            self.pool.complete_store([s for s, _ in mine], ok=False)
            raise
        with_sums = op.u < 0.5 and all(isinstance(c, int) for c in sums)
        self.pool.complete_store(slots, lengths, checksums=sums if with_sums else ())

    def op_remove(self, op: Op) -> None:
        _, keys = self.keys(op)
        self.pool.remove(keys[0])

    def op_sweep(self, op: Op) -> None:
        self.pool.sweep()

    def op_stats(self, op: Op) -> None:
        st = self.pool.stats()
        if st.slot_count != self.slot_count or st.used_slots > self.slot_count:
            self.invalid("stats: counts beyond the geometry")

    def op_reattach(self, op: Op) -> None:
        pool, self.pool = self.pool, None  # dropped even if close raises
        pool.close()
        self.pool = self.kv.KVPool.attach(self.path, **self.attach_kwargs)

    def op_badarg(self, op: Op) -> None:
        """Out-of-range arguments (issue 17's PoolArgumentError list): each must be a typed
        error (or harmless), never a crash."""
        s = op.sub % self.slot_count
        name = BADARGS[op.sub % len(BADARGS)]
        buf = (ctypes.c_char * 64)()
        addr = ctypes.addressof(buf)
        if name == "read offset 2**64-1":
            self.pool.read(s, bytearray(16), (1 << 64) - 1)
        elif name == "read past the slot":
            self.pool.read(s, bytearray(16), self.slot_size - 8)
        elif name == "slot_length(2**40)":
            self.pool.slot_length(1 << 40)
        elif name == "slot_length(-1)":
            self.pool.slot_length(-1)
        elif name == "unpin(2**32 + slot)":
            self.pool.unpin([(1 << 32) + s])
        elif name == "scatter segments summing past 2**64":
            self.pool.scatter([s], [0], [(addr, 64, 1 << 63), (addr, 64, 1 << 63)], 1, True)
        elif name == "scatter block_id*stride past 2**64":
            self.pool.scatter([s], [1 << 62], [(addr, 1 << 8, 64)], 1, True)
        elif name == "complete_store(2**40)":
            self.pool.complete_store([1 << 40], [1], ok=True)
        else:  # gather into a slot this handle did not reserve
            self.pool.gather([s], [0], [(addr, 64, 64)], 1)
        self.invalid(f"badarg accepted: {name}")

    def abrupt(self, op: Op) -> None:
        """Exit without close: plainly, holding pins, or with half-written slots."""
        variant = ("plain", "pins", "writing")[op.sub % 3]
        if self.pool is not None and variant != "plain":
            _, keys = self.keys(op)
            with self.bounded("abrupt"):
                if variant == "pins":
                    self.pool.pin(keys)
                else:
                    for r in self.pool.prepare_store(keys):
                        s = _reserved_slot(r)
                        if 0 <= s < self.slot_count:
                            self.pool.write(s, b"\xab" * 100)
        self.tally.exits[f"abrupt {variant}"] += 1
        self.flush("abrupt", force=True)
        os._exit(EXIT_ABRUPT)


def _under_asan() -> bool:
    """Whether AddressSanitizer's runtime is loaded here (`make sanitize`): it reserves
    terabytes of address space for its shadow, so an address-space limit would kill it."""
    with open("/proc/self/maps") as maps:
        return any("libasan" in line for line in maps)


def _limit_memory(mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if mb > 0 and not _under_asan():
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))


def worker_main(spec: dict[str, Any]) -> int:
    _limit_memory(spec["mem_limit_mb"])
    crash = open(spec["crash"], "w")  # noqa: SIM115 (kept open for faulthandler)
    faulthandler.enable(file=crash, all_threads=True)
    op = Operator(spec)
    try:
        return op.run()
    except Exception:  # noqa: BLE001 - a harness bug: say so, distinctly
        op.tally.info["harness error"] += 1
        op.tally.findings.append({"class": "harness", "traceback": traceback.format_exc()})
        op.flush("harness", force=True)
        return EXIT_HARNESS


# ---------------------------------------------------------------------------------------
# Recovery: a fresh process after the scribbling stopped
# ---------------------------------------------------------------------------------------


def recover_main(spec: dict[str, Any]) -> int:
    """attach, sweep, put fresh keys, get them back: usable, degraded (no error, nothing
    stored) or refused (a typed error); findings as the operators count them."""
    _limit_memory(spec["mem_limit_mb"])
    crash = open(spec["crash"], "w")  # noqa: SIM115
    faulthandler.enable(file=crash, all_threads=True)
    op = Operator(spec)
    outcome = "usable"
    keys = [hashlib.sha256(b"pool-fuzz-recovery-%d" % i).digest() for i in range(8)]
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("attach", lambda: setattr(op, "pool", op.kv.KVPool.attach(op.path, **op.attach_kwargs))),
        ("sweep", lambda: op.pool.sweep()),
        ("put", lambda: op.pool.put(keys, [content(k, op.slot_size) for k in keys])),
        ("get", lambda: op.pool.get(keys)),
        ("stats", lambda: op.pool.stats()),
        ("close", lambda: op.pool.close()),
    ]
    results: dict[str, Any] = {}
    for name, step in steps:
        before = sum(op.tally.errors.values()) + op.tally.failures()
        with op.bounded(name if name in OP_LOCKS else "get"):
            results[name] = step()
        if sum(op.tally.errors.values()) + op.tally.failures() != before:
            typed = [e.split(" ", 1)[1] for e in op.tally.errors if e.startswith(name + " ")]
            outcome = f"refused at {name}: {typed[0]}" if typed else f"failed at {name}"
            break
    if outcome == "usable":
        stored = results["put"].stored
        got = results["get"]
        for pos, b in enumerate(got):
            want = content(keys[pos], op.slot_size)
            if bytes(b) != want:
                op.wrong("recovery get", -1, pos, want, bytes(b))
        if stored == 0 or len(got) < stored:
            outcome = f"degraded (stored {stored}, got back {len(got)})"
    op.tally.recovery[outcome] += 1
    op.flush("stop", force=True)
    return 0


# ---------------------------------------------------------------------------------------
# The parent: one epoch, and runs of epochs
# ---------------------------------------------------------------------------------------


@dataclass
class Seat:
    index: int
    gen: int = -1
    proc: subprocess.Popen[bytes] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)   # signals we sent this process
    started: float = 0.0
    respawn_at: float = 0.0
    ended: list[dict[str, Any]] = field(default_factory=list)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def _spawn(mode: str, spec: dict[str, Any], workdir: Path, name: str) -> tuple[
        subprocess.Popen[bytes], dict[str, Path]]:
    files = {k: workdir / f"{name}.{k}" for k in ("result", "hang", "crash", "log")}
    spec = dict(spec, **{k: str(files[k]) for k in ("result", "hang", "crash")})
    log = open(files["log"], "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kvpool.pool_fuzz", mode, json.dumps(spec)],
            cwd=ROOT, env=_python_env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    finally:
        log.close()
    return proc, files


def _read(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _classify_exit(tally: Tally, rc: int, files: dict[str, Path], sent: set[int],
                   who: str, recent: list[dict[str, Any]], seed: int) -> str:
    """Count how a process ended; crashes and hangs become findings."""
    try:
        res = json.loads(files["result"].read_text())
    except (OSError, ValueError):
        res = {}
    if res:
        tally.merge(Tally.from_json(res))
    hang_text = _read(files["hang"])
    if rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig in sent:
            return f"killed ({name}, sent)"
        tally.add_finding("crash", {
            "who": who, "signal": name, "seed": seed, "stack": _read(files["crash"], 2500),
            "recent_scribbles": recent, "log": _read(files["log"], 1500)})
        return f"crash ({name})"
    if rc == FAULTHANDLER_EXIT and hang_text:
        tally.add_finding("hang", {"who": who, "seed": seed, "stack": hang_text[-2500:],
                                   "recent_scribbles": recent})
        return "hang (watchdog)"
    if rc == 0:
        return "stopped"
    if rc == EXIT_ABRUPT:
        return "abrupt exit (drawn)"
    if rc == EXIT_REFUSED:
        return "attach refused"
    if rc == EXIT_HARNESS:
        tally.findings.append({"class": "harness", "who": who, "seed": seed,
                               "log": _read(files["log"])})
        return "harness error"
    # Any other status (e.g. the interpreter aborted without a signal): a crash.
    tally.add_finding("crash", {"who": who, "status": rc, "seed": seed,
                                "stack": _read(files["crash"], 2500),
                                "log": _read(files["log"], 1500), "recent_scribbles": recent})
    return f"crash (status {rc})"


@dataclass
class EpochResult:
    seed: int
    tally: Tally
    wall_s: float
    geometry: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"epoch_seed": self.seed, "wall_s": round(self.wall_s, 2),
                **self.tally.to_json()}


def plan(seed: int, cfg: FuzzConfig, n: int = 20) -> dict[str, Any]:
    """The first `n` draws of an epoch seed (operators of seat 0 and 1, first generation;
    scribbles; signals): what `seed` means, without running it."""
    g = Geometry(size=4 << 20, version=2, slot_size=cfg.slot_size, slot_count=cfg.slot_count,
                 index_capacity=256, max_clients=cfg.max_clients, max_pins=cfg.max_pins,
                 clients=4096, pins=8192, index=12288, slots=16384, data=2 << 20)
    ops = {}
    for seat in range(min(cfg.procs, 2)):
        rng = random.Random(derive(seed, "op", seat, 0))
        ops[seat] = [asdict(draw_op(rng, cfg.keyspace, cfg.badargs)) for _ in range(n)]
    crng = random.Random(derive(seed, "control"))
    header_epoch = crng.random() < cfg.header_share
    control = [_draw_control(crng, cfg) for _ in range(n)]
    srng = random.Random(derive(seed, "scribble"))
    scribbles = []
    t = srng.expovariate(cfg.scribble_hz) if cfg.scribble_hz > 0 else 0.0
    for _ in range(n):  # as run_epoch draws them
        sc = draw_scribble(srng, g, cfg.regions, cfg.procs)
        scribbles.append(dict(sc.brief(), t=round(cfg.warmup_s + t, 3),
                              heal_s=round(srng.uniform(0.02, 0.5), 3)))
        t += srng.expovariate(cfg.scribble_hz) if cfg.scribble_hz > 0 else 0.0
    return {"header_epoch": header_epoch, "ops": ops, "scribbles": scribbles,
            "control": control}


def _draw_control(rng: random.Random, cfg: FuzzConfig) -> tuple[float, int, str, float]:
    """(delay, seat, signal kind, stop length) of the next signal event."""
    delay = rng.expovariate(cfg.kill_hz) if cfg.kill_hz > 0 else 1e9
    return (delay, rng.randrange(cfg.procs), rng.choice(("KILL", "KILL", "KILL", "STOP")),
            rng.uniform(0.2, 1.5))


def _cleanup_pool(path: Path) -> None:
    for p in [path, *path.parent.glob(path.name + ".*")]:
        with contextlib.suppress(OSError):
            p.unlink()


def run_epoch(cfg: FuzzConfig, epoch_seed: int, log: Callable[[str], None] = lambda s: None,
              ) -> EpochResult:
    """One epoch: pool, operators, scribbles and signals for cfg.epoch_s, then stop and
    recovery. The pool file and work files are removed however it ends."""
    import kvpool

    t_start = time.monotonic()
    tally = Tally()
    tag = f"{os.getpid()}-{epoch_seed:016x}-{os.urandom(3).hex()}"
    path = Path(f"/dev/shm/beluga-fuzz-{tag}.pool")
    workdir = Path(tempfile.mkdtemp(prefix=f"beluga-fuzz-{tag}-"))
    seats = [Seat(i) for i in range(cfg.procs)]
    scribble_log: list[tuple[float, dict[str, Any]]] = []
    srng = random.Random(derive(epoch_seed, "scribble"))
    crng = random.Random(derive(epoch_seed, "control"))
    fd = -1
    geom: Geometry | None = None
    wall0 = time.time() - (time.monotonic() - t_start)  # wall clock at t_start

    def recent(now: float) -> list[dict[str, Any]]:
        """The scribbles of the 3 s before `now` (seconds into the epoch)."""
        return [dict(s, t=round(t, 3)) for t, s in scribble_log if now - 3.0 <= t <= now][-8:]

    try:
        create_kw: dict[str, Any] = dict(
            slot_size=cfg.slot_size, slot_count=cfg.slot_count, fingerprint=FP,
            max_clients=cfg.max_clients, max_pins=cfg.max_pins)
        if _accepts(kvpool.KVPool.create, "lock_timeout_s"):
            create_kw["lock_timeout_s"] = cfg.lock_timeout_s
        else:  # this build's lock timeout is fixed: bound the calls by it
            cfg = replace(cfg, lock_timeout_s=NATIVE_LOCK_TIMEOUT_S)
        kvpool.KVPool.create(path, **create_kw).close()
        geom = Geometry.read(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        pristine = os.pread(fd, 4096, 0)
        restores: list[tuple[float, int, int]] = []  # (due, offset, bytes) of the header
        base_spec = {"path": str(path), "slot_size": cfg.slot_size,
                     "slot_count": cfg.slot_count, "keyspace": cfg.keyspace,
                     "lock_timeout_s": cfg.lock_timeout_s, "margin_s": cfg.margin_s,
                     "mem_limit_mb": cfg.mem_limit_mb, "badargs": cfg.badargs,
                     "stop": str(workdir / "STOP")}


        def spawn(seat: Seat) -> None:
            seat.gen += 1
            seed = derive(epoch_seed, "op", seat.index, seat.gen)
            seat.proc, seat.files = _spawn("worker", dict(base_spec, seed=seed), workdir,
                                           f"op{seat.index}.{seat.gen}")
            seat.killed = set()
            seat.started = time.monotonic()

        def reap(seat: Seat, now: float) -> bool:
            if seat.proc is None or seat.proc.poll() is None:
                return False
            seed = derive(epoch_seed, "op", seat.index, seat.gen)
            how = _classify_exit(tally, seat.proc.returncode, seat.files, seat.killed,
                                 f"operator {seat.index}.{seat.gen} (pid {seat.proc.pid})",
                                 recent(now - t_start), seed)
            tally.exits[how] += 1
            if how.startswith(("crash", "hang")):
                log(f"  {how}: operator {seat.index}.{seat.gen}")
            seat.proc = None
            seat.respawn_at = now + (1.0 if how == "attach refused" else 0.1)
            return True

        def seat_pid(i: int) -> int | None:
            p = seats[i % len(seats)].proc
            return p.pid if p is not None and p.poll() is None else None

        for seat in seats:
            spawn(seat)
        header_epoch = crng.random() < cfg.header_share
        header_from = cfg.epoch_s * (1 - cfg.header_tail)
        next_scribble = t_start + cfg.warmup_s + (
            srng.expovariate(cfg.scribble_hz) if cfg.scribble_hz > 0 else 1e9)
        ctl = _draw_control(crng, cfg)
        next_signal = t_start + cfg.warmup_s + ctl[0]
        conts: list[tuple[float, Seat, int]] = []  # SIGCONT due
        end = t_start + cfg.epoch_s
        while (now := time.monotonic()) < end:
            while now >= next_scribble:
                sc = draw_scribble(srng, geom, cfg.regions, cfg.procs)
                restore_s = srng.uniform(0.02, 0.5)
                permanent = header_epoch and next_scribble - t_start >= header_from
                apply_scribble(fd, sc, seat_pid)
                label = sc.label
                if sc.offset < CHECKSUM_END + 8 and sc.label.split(".")[0] in HEADER_REGIONS \
                        and not permanent:
                    # Before the epoch's header tail, the attach-checked header heals after
                    # a moment (its bytes never change legitimately): live handles see the
                    # garbage, and the epoch goes on with processes attaching.
                    label += " (transient)"
                    restores.append((now + restore_s, sc.offset, len(sc.data)))
                    if sc.how == "resum":
                        restores.append((now + restore_s, CHECKSUM_END, 8))
                tally.scribbles[label] += 1
                scribble_log.append((now - t_start, sc.brief()))
                next_scribble += srng.expovariate(cfg.scribble_hz)
            for item in [r for r in restores if now >= r[0]]:
                restores.remove(item)
                _, off, n = item
                os.pwrite(fd, pristine[off:off + n], off)
            if now >= next_signal:
                _, seat_i, kind, stop_s = ctl
                seat = seats[seat_i]
                if seat.proc is not None and seat.proc.poll() is None:
                    if kind == "KILL":
                        seat.killed.add(signal.SIGKILL)
                        seat.proc.send_signal(signal.SIGKILL)
                    else:
                        seat.proc.send_signal(signal.SIGSTOP)
                        conts.append((now + stop_s, seat, seat.proc.pid))
                    tally.signals[kind] += 1
                ctl = _draw_control(crng, cfg)
                next_signal += ctl[0]
            for due, seat, pid in list(conts):
                if now >= due:
                    conts.remove((due, seat, pid))
                    if seat.proc is not None and seat.proc.pid == pid:
                        seat.proc.send_signal(signal.SIGCONT)
            for seat in seats:
                reap(seat, now)
                if seat.proc is None and now >= seat.respawn_at:
                    spawn(seat)
            time.sleep(0.01)
        # -- stop: no more scribbles or signals; operators finish their op and close ------
        for _, off, n in restores:  # transient header scribbles heal now
            os.pwrite(fd, pristine[off:off + n], off)
        (workdir / "STOP").touch()
        for _, seat, pid in conts:
            if seat.proc is not None and seat.proc.pid == pid:
                seat.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + max(op_bound(cfg.lock_timeout_s, cfg.margin_s, k)
                                          for k in OP_LOCKS) + 5
        while any(s.proc is not None for s in seats) and time.monotonic() < deadline:
            for seat in seats:
                reap(seat, time.monotonic())
            time.sleep(0.02)
        for seat in seats:
            if seat.proc is not None:  # alive past every bound and its own watchdog
                seat.killed.add(signal.SIGKILL)
                seat.proc.kill()
                seat.proc.wait()
                tally.add_finding("hang", {"who": f"operator {seat.index}.{seat.gen}",
                                           "seed": derive(epoch_seed, "op", seat.index,
                                                          seat.gen),
                                           "stack": "did not stop (watchdog did not fire)"})
                reap(seat, time.monotonic())
        # -- recovery ------------------------------------------------------------------
        rec_seed = derive(epoch_seed, "recover")
        proc, files = _spawn("recover", dict(base_spec, seed=rec_seed,
                                             stop=str(workdir / "NEVER")), workdir, "recover")
        try:
            rc = proc.wait(timeout=sum(op_bound(cfg.lock_timeout_s, cfg.margin_s, k)
                                       for k in ("attach", "sweep", "put", "get", "stats",
                                                 "close")) + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            tally.add_finding("hang", {"who": "recovery", "seed": rec_seed,
                                       "stack": "recovery did not finish"})
        how = _classify_exit(tally, rc, files, set(), "recovery", [], rec_seed)
        if how != "stopped":
            tally.recovery[how] += 1
    finally:
        for seat in seats:
            if seat.proc is not None and seat.proc.poll() is None:
                seat.proc.kill()
                seat.proc.wait()
        if fd >= 0:
            os.close(fd)
        _cleanup_pool(path)
        if cfg.keep_dir:
            shutil.copytree(workdir, Path(cfg.keep_dir) / workdir.name, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    for f in tally.findings:
        f.setdefault("epoch_seed", epoch_seed)
        if "recent_scribbles" not in f and "at" in f and scribble_log:
            f["recent_scribbles"] = recent(f["at"] - wall0)
    return EpochResult(epoch_seed, tally, time.monotonic() - t_start,
                       asdict(geom) if geom else {})


@dataclass
class RunResult:
    seed: int
    config: dict[str, Any]
    epochs: list[EpochResult]
    total: Tally
    wall_s: float

    def summary(self, details: bool = True) -> dict[str, Any]:
        t = self.total.to_json()
        out: dict[str, Any] = {
            "seed": self.seed, "config": self.config, "wall_s": round(self.wall_s, 1),
            "epochs": len(self.epochs),
            "epoch_seeds": [e.seed for e in self.epochs],
            "failing_epoch_seeds": {c: [e.seed for e in self.epochs if e.tally.classes[c]]
                                    for c in CLASSES},
            **{k: t[k] for k in ("classes", "ops", "errors", "invalid", "info", "recovery",
                                 "exits", "signals", "scribbles", "max_s")},
        }
        if details:
            out["findings"] = t["findings"]
        return out


def run_fuzz(cfg: FuzzConfig, epochs: int = 1, minutes: float = 0.0,
             log: Callable[[str], None] = lambda s: None,
             epoch_seeds: Sequence[int] = ()) -> RunResult:
    """Epochs of `cfg` with seeds derived from cfg.seed (or the given `epoch_seeds`), until
    `epochs` have run or, with `minutes`, until that much time has passed."""
    t0 = time.monotonic()
    results: list[EpochResult] = []
    total = Tally()
    i = 0
    while True:
        if epoch_seeds:
            if i >= len(epoch_seeds):
                break
            seed = epoch_seeds[i]
        else:
            if minutes > 0 and time.monotonic() - t0 >= minutes * 60:
                break
            if minutes <= 0 and i >= epochs:
                break
            seed = derive(cfg.seed, "epoch", i)
        r = run_epoch(cfg, seed, log)
        results.append(r)
        total.merge(r.tally)
        c = r.tally.classes
        log(f"epoch {i} seed {seed}: {sum(r.tally.ops.values())} ops, "
            f"{sum(r.tally.scribbles.values())} scribbles, crash {c['crash']} hang {c['hang']} "
            f"wrong {c['wrong']} escape {c['escape']}, recovery {dict(r.tally.recovery)} "
            f"({r.wall_s:.1f} s)")
        i += 1
    return RunResult(cfg.seed, asdict(cfg), results, total, time.monotonic() - t0)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "worker":
        return worker_main(json.loads(argv[1]))
    if len(argv) >= 2 and argv[0] == "recover":
        return recover_main(json.loads(argv[1]))
    if len(argv) >= 2 and argv[0] == "plan":
        n = int(argv[2]) if len(argv) > 2 else 10
        print(json.dumps(plan(int(argv[1]), FuzzConfig(), n), indent=1))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
