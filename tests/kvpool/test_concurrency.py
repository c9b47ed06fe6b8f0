"""Many real processes on one pool: no torn or wrong block, and SIGKILL at random moments
leaves no pin, lock or half-written block behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpool import KVPool
from tests.kvpool.conftest import FP, block_for, key

ROOT = Path(__file__).resolve().parents[2]
SLOT = 16 * 1024
KEYSPACE = 300


def hammer(path: Path, seed: int, ops: int) -> subprocess.Popen[str]:
    """Start a hammer and return once it has attached and starts working."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kvpool.hammer", str(path), str(seed), str(ops),
         str(KEYSPACE)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def verify_all(pool: KVPool) -> int:
    """Every visible block holds exactly its key's content; returns how many are visible."""
    visible = 0
    for i in range(KEYSPACE):
        k = key(i)
        got = pool.get([k])
        if got:
            visible += 1
            assert got[0] == block_for(k, SLOT - (k[0] % 4) * 64), f"block {i} is wrong"
    return visible


@pytest.mark.parametrize("coherence", ["none", "flush"])
def test_eight_processes_random_ops_zero_torn(tmp_path: Path, coherence: str) -> None:
    path = tmp_path / "stress.pool"
    owner = KVPool.create(path, slot_size=SLOT, slot_count=96, fingerprint=FP,
                          coherence=coherence)  # type: ignore[arg-type]
    procs = [hammer(path, seed, 1500) for seed in range(8)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["torn"] for r in results) == 0
    assert sum(r["loads"] for r in results) > 1000
    st = owner.stats()
    assert st.evictions > 0  # the pool was small enough to churn
    assert (st.pinned_slots, st.writing_slots, st.clients) == (0, 0, 1)
    verify_all(owner)
    owner.close()


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    path = tmp_path / "crash.pool"
    owner = KVPool.create(path, slot_size=SLOT, slot_count=64, fingerprint=FP)
    rng = random.Random(7)
    procs = [hammer(path, seed, 0) for seed in range(4)]
    kills = 0
    seed = 100
    while kills < 50:
        time.sleep(rng.uniform(0.01, 0.08))
        i = rng.randrange(len(procs))
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()
        kills += 1
        seed += 1
        procs[i] = hammer(path, seed, 0)
    # One more kind of death: holding the pool lock itself.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kvpool import KVPool;"
         "p = KVPool.attach(sys.argv[1]); p._p.debug_lock(); print('locked', flush=True);"
         "time.sleep(60)", str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    owner.sweep()
    st = owner.stats()
    assert st.reclaimed >= 50  # every killed client was found dead and swept
    assert st.recoveries >= 1  # someone took over the dead holder's lock
    assert (st.pinned_slots, st.writing_slots, st.clients) == (0, 0, 1), st
    assert st.used_slots == verify_all(owner)
    # The pool still works for a newcomer.
    fresh = KVPool.attach(path, fingerprint=FP)
    assert fresh.put([key(0)], [block_for(key(0), SLOT)]).stored in (0, 1)
    fresh.close()
    owner.close()


def test_racing_openers_share_one_pool(tmp_path: Path) -> None:
    """Six processes open a missing pool at once (as workers starting together do): one
    creates it, the rest attach to that same pool, and no build file is left behind."""
    path = tmp_path / "race.pool"
    code = (
        "import sys\n"
        "from kvpool import KVPool\n"
        "from tests.kvpool.conftest import FP\n"
        "sys.stdin.readline()\n"
        f"p = KVPool.open({str(path)!r}, slot_size=65536, slot_count=512, fingerprint=FP)\n"
        "print(p.uuid, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    try:
        for p in procs:    # one "go" to all: they open together
            assert p.stdin is not None
            p.stdin.write("go\n")
        for p in procs:
            assert p.stdin is not None
            p.stdin.flush()
        uuids = {p.stdout.readline().strip() for p in procs if p.stdout is not None}
        assert len(uuids) == 1 and "" not in uuids
        assert [f.name for f in tmp_path.iterdir()] == ["race.pool"]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=30)
