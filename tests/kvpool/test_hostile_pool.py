"""Issue 17: a pool file written by crashed, buggy or hostile neighbours, and callers that
misuse the API, get a typed kvpool.PoolError — never a SIGSEGV/SIGBUS, a hang, a wrong block
or an error of another type (DESIGN.md "Trust boundaries").

One test per class of hazard, parametrized by case. Each case runs in its own interpreter
(hostile_pool.run_in_child) on a small pool in /dev/shm, so a crash or an endless loop
fails one case, not the whole run; what the child does is in hostile_scenarios.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kvpool import hostile_pool as h
from tests.kvpool import hostile_scenarios as sc
from tests.kvpool.blocks import small_tmpfs

CHILD_TIMEOUT = 15.0


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory in /dev/shm (pools live there in production), removed after."""
    d = Path(tempfile.mkdtemp(prefix="beluga-hostile-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _layout_matches() -> None:
    h.check_layout()


@pytest.mark.parametrize(
    "case", sc.SCRIBBLES + [f"random-{s}" for s in sc.RANDOM_SEEDS])
def test_scribbled_metadata_is_a_typed_error_and_the_pool_recovers(shm_dir: Path,
                                                                  case: str) -> None:
    """A clock hand, index, bucket, pin count or slot length scribbled (and random values
    over every metadata region, 10 fixed seeds): PoolCorruptError or a correct answer,
    never a wrong block; then a fresh handle round-trips (the pool rebuilt itself)."""
    path = str(shm_dir / "p.pool")
    if case.startswith("random-"):
        h.run_in_child(sc.scenario_random_scribbles, path, int(case.split("-")[1]),
                       timeout=CHILD_TIMEOUT)
    else:
        h.run_in_child(sc.scenario_scribble, path, case, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("case", ["create-geometry", "create-geometry-in-limits",
                                  "attach-geometry", "write-offset", "read-offset",
                                  "gather-sum", "scatter-sum", "stride-wrap", "unpin-2^32"])
def test_wrapping_arithmetic_is_a_typed_error(shm_dir: Path, case: str) -> None:
    """Sizes whose product or sum wraps past 2**64 (create and attach geometry, offset + n,
    gather/scatter segments, block_id * stride, slots >= 2**32): PoolArgumentError (or
    PoolCorruptError for a header), and the neighbouring block intact."""
    if case != "create-geometry-in-limits":
        h.run_in_child(sc.scenario_wrap, str(shm_dir / "p.pool"), case, timeout=CHILD_TIMEOUT)
        return
    if os.geteuid() != 0:
        pytest.skip("a 16 MiB tmpfs to create in needs root")
    with small_tmpfs(shm_dir / "small") as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here")
        h.run_in_child(sc.scenario_wrap, str(small / "p.pool"), case, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("call", sc.CLOSED_CALLS + sc.PROPERTIES)
def test_any_call_after_close_is_pool_closed_error(shm_dir: Path, call: str) -> None:
    """Every method after close() raises PoolClosedError; close() again is a no-op; a
    property keeps its value or refuses."""
    h.run_in_child(sc.scenario_after_close, str(shm_dir / "p.pool"), call, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("call", sc.BUSY_CALLS)
def test_errors_keep_their_type_when_the_lock_stays_held(shm_dir: Path, call: str) -> None:
    """A stopped process holds the lock: each call raises PoolBusyError within its lock
    timeout (unpin, stats and close may instead return), never beluga_native's error."""
    h.run_in_child(sc.scenario_busy, str(shm_dir / "p.pool"), call, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("case", ["bare-pid", "reused-pid", "other-host-same-pidns",
                                  "stale-holder-unlock"])
def test_lock_liveness_is_judged_by_full_identity(shm_dir: Path, case: str) -> None:
    """A dead holder's lock is taken over whatever its token looks like (no client entry, a
    reused pid, another host sharing our pid-namespace inode), and a holder whose lease
    ran out cannot release the lock its taker now holds."""
    h.run_in_child(sc.scenario_liveness, str(shm_dir / "p.pool"), case, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("case", ["other-uid-0666", "other-uid-0600", "own-uid-0666",
                                  "symlink", "fifo-build"])
def test_host_neighbours_cannot_plant_files(shm_dir: Path, case: str) -> None:
    """attach refuses (PoolPermissionError) a pool file of another user or writable by
    others, and a symlink; create does not block on a FIFO named like a build file."""
    if case.startswith("other-uid") and os.geteuid() != 0:
        pytest.skip("giving a pool file to another uid needs root")
    path = str(shm_dir / "p.pool")
    if case == "fifo-build":
        h.run_in_child(sc.scenario_fifo_build, path, timeout=10.0)
    else:
        h.run_in_child(sc.scenario_neighbour_attach, path, case, timeout=CHILD_TIMEOUT)
