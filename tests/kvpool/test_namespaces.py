"""Two hosts on one pool, simulated: clients in separate pid, network and mount namespaces
(unshare), each with its own boot_id bind-mounted over /proc/sys/kernel/random/boot_id, all
mapping one pool file with coherence="flush". Both clients are pid 1 in their namespace, so
a pid compared across them would be mistaken for the other's (or for the caller itself).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpool import KVPool
from tests.kvpool.conftest import FP

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 2.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to make pid, network and mount namespaces")


class Host:
    """A pool client alone in new pid, net and mount namespaces with its own boot_id."""

    def __init__(self, pool: Path, boot_id: str, tmp: Path) -> None:
        fake = tmp / f"boot_id-{boot_id[:8]}"
        fake.write_text(boot_id + "\n")
        script = (f"mount --bind {fake} /proc/sys/kernel/random/boot_id && "
                  f"exec {sys.executable} -m tests.kvpool.ns_agent {pool}")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc",
             "sh", "-c", script],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self.read(timeout=30)

    def read(self, timeout: float = 20) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                assert line, f"the agent exited ({self.proc.poll()})"
                return dict(json.loads(line))
        raise AssertionError("the agent did not answer in time")

    def ask(self, cmd: str, timeout: float = 20) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def agent_pid(self) -> int:
        """The agent's pid as this (the parent) namespace sees it: unshare's child."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def kill(self) -> None:
        os.kill(self.agent_pid(), signal.SIGKILL)  # pid 1 of its namespace: all of it dies
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def shared_pool() -> Iterator[Path]:
    path = Path("/dev/shm") / f"beluga-ns-test-{uuid.uuid4().hex[:8]}.pool"
    pool = KVPool.create(path, slot_size=4096, slot_count=64, fingerprint=FP,
                         coherence="flush", lease_s=LEASE_S)
    pool.close()
    yield path
    path.unlink(missing_ok=True)


def test_two_hosts_share_blocks_and_recover_each_others_dead_lock_holder(
        shared_pool: Path, tmp_path: Path) -> None:
    a = Host(shared_pool, "aaaaaaaa-0000-4000-8000-000000000001", tmp_path)
    b = Host(shared_pool, "bbbbbbbb-0000-4000-8000-000000000002", tmp_path)
    try:
        assert a.ready["ready"] == 1 and b.ready["ready"] == 1  # the same pid on both
        # Blocks written on one host are read intact on the other, both ways.
        assert a.ask("put 0 8") == {"stored": 8}
        assert b.ask("get 0 8") == {"got": 8, "bad": 0}
        assert b.ask("put 8 16") == {"stored": 8}
        assert a.ask("get 0 16") == {"got": 16, "bad": 0}
        # A pins blocks and takes the lock. A is alive and its lease is fresh: B must wait
        # (busy), not take A's pid 1 for its own or for a dead process.
        assert a.ask("pin 0 4") == {"pinned": 4}
        assert a.ask("lock") == {"locked": True}
        assert b.ask("try 0 16 0.3") == {"error": "PoolBusyError"}
        # A's host dies with the lock held. Once A's lease is over, B takes the lock over
        # (rebuilding what A may have left half-done) and drops A's pins.
        a.kill()
        t0 = time.monotonic()
        assert b.ask(f"try 0 16 {LEASE_S * 4}", timeout=LEASE_S * 6) == {"n": 16}
        took = time.monotonic() - t0
        assert took < LEASE_S * 3, took
        st = b.ask("stats")
        assert st["recoveries"] >= 1 and st["reclaimed"] >= 1, st
        assert st["pinned_slots"] == 0 and st["clients"] == 1, st
        assert b.ask("get 0 16") == {"got": 16, "bad": 0}
        # A new process on A's host (pid 1 again, a new boot of the namespace) joins.
        a2 = Host(shared_pool, "aaaaaaaa-0000-4000-8000-000000000001", tmp_path)
        try:
            assert a2.ask("get 0 16") == {"got": 16, "bad": 0}
            assert a2.ask("put 16 20") == {"stored": 4}
            assert b.ask("get 16 20") == {"got": 4, "bad": 0}
        finally:
            a2.close()
    finally:
        a.close()
        b.close()
