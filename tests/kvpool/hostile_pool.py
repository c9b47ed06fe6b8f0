"""Helpers of test_hostile_pool: run a hostile scenario in its own process, and read or
scribble the fields of a pool file the way a buggy or hostile neighbour would.

Offsets follow native/include/beluga/layout.h (checked against its static_asserts by
`check_layout`). Every write goes through the file (pwrite on /dev/shm): the page cache is
what every process has mapped, so a scribble is seen at once by live handles too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_H = ROOT / "native/include/beluga/layout.h"

# -- PoolHeader (layout.h) ---------------------------------------------------------------
# (offset, struct format) of each header field a scenario reads or scribbles.
HEADER: dict[str, tuple[int, str]] = {
    "magic": (0, "<Q"),
    "version": (8, "<I"),
    "header_bytes": (12, "<I"),
    "total_bytes": (16, "<Q"),
    "slot_size": (24, "<Q"),
    "slot_count": (32, "<Q"),
    "index_capacity": (40, "<Q"),
    "max_clients": (48, "<I"),
    "max_pins": (52, "<I"),
    "coherence": (56, "<I"),
    "clients_offset": (64, "<Q"),
    "pins_offset": (72, "<Q"),
    "index_offset": (80, "<Q"),
    "slots_offset": (88, "<Q"),
    "data_offset": (96, "<Q"),
    "fingerprint": (112, "32s"),
    "header_checksum": (160, "<Q"),
    "lock_word": (256, "<Q"),
    "clock_hand": (320, "<Q"),
    "used_slots": (328, "<Q"),
}
CHECKSUM_RANGE = (8, 160)  # kChecksumBegin, kChecksumEnd: FNV-1a 64 over these bytes
MUTABLE_LINE = (320, 344)  # clock_hand, used_slots, generation (under the lock)

# ClientEntry (64 bytes): the fields a fake client needs.
CLIENT: dict[str, tuple[int, str]] = {
    "state": (0, "<Q"),  # (claim time ms << 2) | 1 claiming / 2 live
    "pid": (8, "<I"),
    "nonce": (12, "<I"),  # the low half of the holder's lock token
    "start_ticks": (16, "<Q"),
    "pidns": (24, "<Q"),
    "host": (32, "<Q"),  # FNV-1a 64 of /proc/sys/kernel/random/boot_id
    "last_seen_ns": (40, "<Q"),
    "npins": (48, "<I"),
}
CLIENT_BYTES = 64
CLIENT_LIVE = 2

# SlotMeta (64 bytes).
SLOT: dict[str, tuple[int, str]] = {
    "key": (0, "32s"),
    "state": (32, "<I"),
    "owner": (36, "<I"),
    "pins": (40, "<I"),
    "ref": (44, "<I"),
    "length": (48, "<Q"),
}
SLOT_BYTES = 64
READY = 2


def check_layout() -> None:
    """Fail (not scribble the wrong bytes) if layout.h moved a field these helpers use."""
    text = LAYOUT_H.read_text()
    for struct_name, field, off in re.findall(
            r"static_assert\(offsetof\((\w+), (\w+)\) == (\d+)\)", text):
        tables: dict[str, dict[str, Any]] = {"PoolHeader": HEADER, "ClientEntry": CLIENT,
                                             "SlotMeta": SLOT}
        entry = tables.get(struct_name, {}).get(field)
        if entry is not None:
            assert entry[0] == int(off), (
                f"layout.h puts {struct_name}.{field} at {off}, tests/kvpool/hostile_pool.py "
                f"at {entry[0]}: update the helpers")
    for name, want in (("kChecksumBegin", CHECKSUM_RANGE[0]),
                       ("kChecksumEnd", CHECKSUM_RANGE[1])):
        m = re.search(rf"{name} = (\d+)", text)
        if m:
            assert int(m.group(1)) == want, f"layout.h: {name} is {m.group(1)}, not {want}"


# -- raw access ------------------------------------------------------------------------
def peek(path: str | Path, offset: int, fmt: str) -> Any:
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack(fmt, os.pread(fd, struct.calcsize(fmt), offset))[0]
    finally:
        os.close(fd)


def poke(path: str | Path, offset: int, fmt: str, value: Any) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack(fmt, value), offset)
    finally:
        os.close(fd)


def poke_bytes(path: str | Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def header(path: str | Path, name: str) -> Any:
    off, fmt = HEADER[name]
    return peek(path, off, fmt)


def set_header(path: str | Path, name: str, value: Any, *, fix_checksum: bool = False) -> None:
    off, fmt = HEADER[name]
    poke(path, off, fmt, value)
    if fix_checksum:
        fix_header_checksum(path)


def header_checksum(data: bytes) -> int:
    """FNV-1a 64 of the checksummed header range (layout.h kChecksumBegin..End)."""
    x = 1469598103934665603
    for b in data[CHECKSUM_RANGE[0]:CHECKSUM_RANGE[1]]:
        x = ((x ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return x


def fix_header_checksum(path: str | Path) -> None:
    """Recompute the header checksum after an edit: the scribble then passes attach's
    checksum test and only the geometry checks can catch it."""
    with open(path, "rb") as f:
        head = f.read(4096)
    set_header(path, "header_checksum", header_checksum(head))


def slot_offset(path: str | Path, slot: int, field: str) -> int:
    off, _ = SLOT[field]
    return int(header(path, "slots_offset")) + slot * SLOT_BYTES + off


def slot_field(path: str | Path, slot: int, field: str) -> Any:
    return peek(path, slot_offset(path, slot, field), SLOT[field][1])


def set_slot_field(path: str | Path, slot: int, field: str, value: Any) -> None:
    poke(path, slot_offset(path, slot, field), SLOT[field][1], value)


def client_offset(path: str | Path, client: int, field: str) -> int:
    off, _ = CLIENT[field]
    return int(header(path, "clients_offset")) + client * CLIENT_BYTES + off


def client_field(path: str | Path, client: int, field: str) -> Any:
    return peek(path, client_offset(path, client, field), CLIENT[field][1])


def set_client_field(path: str | Path, client: int, field: str, value: Any) -> None:
    poke(path, client_offset(path, client, field), CLIENT[field][1], value)


def check_own_entry(path: str | Path, client: int) -> None:
    """Our own client entry reads back as this process: the ClientEntry offsets are right."""
    assert client_field(path, client, "pid") == os.getpid(), "ClientEntry.pid offset moved"
    assert client_field(path, client, "pidns") == own_pidns(), "ClientEntry.pidns moved"
    assert client_field(path, client, "state") & 3 == CLIENT_LIVE, "ClientEntry.state moved"
    assert client_field(path, client, "nonce") != 0, "ClientEntry.nonce moved"


def make_client(path: str | Path, client: int, *, pid: int, ticks: int, pidns: int,
                host: int, last_seen_ns: int, nonce: int = 0x5EED1234) -> int:
    """Write a live client entry with this identity; returns the lock token naming it."""
    set_client_field(path, client, "pid", pid)
    set_client_field(path, client, "start_ticks", ticks)
    set_client_field(path, client, "pidns", pidns)
    set_client_field(path, client, "last_seen_ns", last_seen_ns)
    set_client_field(path, client, "npins", 0)
    set_client_field(path, client, "host", host)
    set_client_field(path, client, "nonce", nonce)
    set_client_field(path, client, "state", (time.time_ns() // 1_000_000) << 2 | CLIENT_LIVE)
    return token_of(path, client)


def token_of(path: str | Path, client: int) -> int:
    """The lock token of client entry `client`: (index + 1) << 32 | nonce."""
    return ((client + 1) << 32) | int(client_field(path, client, "nonce"))


def bare_pid_token(pid: int) -> int:
    """A token naming no client entry (index 0): what format 2 wrote while a process was
    still attaching, its pid in the low half."""
    return pid


def index_buckets(path: str | Path) -> list[int]:
    cap = int(header(path, "index_capacity"))
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = os.pread(fd, cap * 4, int(header(path, "index_offset")))
    finally:
        os.close(fd)
    return list(struct.unpack(f"<{cap}I", raw))


def bucket_of(path: str | Path, slot: int) -> int:
    """The index bucket that names `slot` (value slot + 1)."""
    return index_buckets(path).index(slot + 1)


def set_bucket(path: str | Path, bucket: int, value: int) -> None:
    poke(path, int(header(path, "index_offset")) + bucket * 4, "<I", value)


def regions(path: str | Path) -> dict[str, tuple[int, int]]:
    """[begin, end) of each metadata region (its used part)."""
    h = {k: int(header(path, k)) for k in ("clients_offset", "pins_offset", "index_offset",
                                          "slots_offset", "max_clients", "max_pins",
                                          "index_capacity", "slot_count")}
    return {
        "clients": (h["clients_offset"], h["clients_offset"] + h["max_clients"] * CLIENT_BYTES),
        "pins": (h["pins_offset"], h["pins_offset"] + h["max_clients"] * h["max_pins"] * 4),
        "index": (h["index_offset"], h["index_offset"] + h["index_capacity"] * 4),
        "slots": (h["slots_offset"], h["slots_offset"] + h["slot_count"] * SLOT_BYTES),
        "header": MUTABLE_LINE,
    }


# -- process identity (for fake client entries) ------------------------------------------
def start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def own_pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


# -- child runner --------------------------------------------------------------------------
@dataclass
class Child:
    out: str
    seconds: float


def run_in_child(fn: Callable[..., None], *args: Any, timeout: float = 15.0) -> Child:
    """Run the module-level function `fn(*args)` in a fresh interpreter (its own session),
    so a SIGSEGV, SIGBUS or endless loop there is a clean test failure here. The test fails
    unless the child exits 0; everything the child started is killed afterwards."""
    code = ("import json, sys\n"
            f"from {fn.__module__} import {fn.__qualname__} as scenario\n"
            "scenario(*json.loads(sys.argv[1]))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    what = f"{fn.__name__}{tuple(args)!r}"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code, json.dumps(args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        _kill_group(proc.pid)
        out, _ = proc.communicate()
    finally:
        _kill_group(proc.pid)
    if hung:
        raise AssertionError(f"{what}: still running after {timeout:.0f} s (a hang)\n"
                             f"{_tail(out)}")
    took = time.monotonic() - t0
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"{what}: killed by {name} after {took:.1f} s\n{_tail(out)}")
    if proc.returncode != 0:
        raise AssertionError(f"{what}: exit {proc.returncode} after {took:.1f} s\n"
                             f"{_tail(out)}")
    print(f"{what} ({took:.2f} s):\n{out}")  # the child's story, shown by pytest -rP / -s
    return Child(out=out, seconds=took)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- in-child helpers ----------------------------------------------------------------------
def note(msg: str) -> None:
    """A line of the child's story (shown when the test fails)."""
    print(msg, flush=True)


def attempt(fn: Callable[[], Any], allowed: Sequence[type[BaseException]]) -> tuple[Any, Any]:
    """(result, None) or (None, the allowed exception); anything else propagates."""
    try:
        return fn(), None
    except tuple(allowed) as exc:
        return None, exc


def spawn(fn: Callable[..., None], *args: Any) -> subprocess.Popen[str]:
    """Start `fn(*args)` in another interpreter (a second process of a scenario), its
    stdout a pipe. The caller kills and reaps it (a zombie still looks alive)."""
    code = ("import json, sys\n"
            f"from {fn.__module__} import {fn.__qualname__} as scenario\n"
            "scenario(*json.loads(sys.argv[1]))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ('T': stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while process_state(pid) not in "Tt":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.002)
