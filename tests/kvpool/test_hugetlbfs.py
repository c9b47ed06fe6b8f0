"""The hugetlbfs backing: a pool file mapped with 2 MiB pages.

Uses an existing hugetlbfs mount with room, else (as root) reserves pages and mounts a
private one for this module; skips where neither is possible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpool import KVPool, PoolIOError, hugetlbfs
from tests.kvpool.conftest import FP, block_for, key

SLOT = 256 * 1024
COUNT = 64  # 16 MiB of data + metadata: a handful of 2 MiB pages


@pytest.fixture(scope="module")
def huge_dir() -> Iterator[Path]:
    need = 64 * 1024 * 1024
    found = hugetlbfs.find_mount(need)
    if found is not None:
        yield found
        return
    try:
        with hugetlbfs.temporary_mount(need) as mount:
            yield mount
    except PoolIOError as exc:
        pytest.skip(f"no hugetlbfs available: {exc}")


def test_pool_on_hugetlbfs_round_trips_across_processes(huge_dir: Path) -> None:
    path = huge_dir / f"test-{os.getpid()}.pool"
    free_before = hugetlbfs.free_pages()
    pool = KVPool.create(path, slot_size=SLOT, slot_count=COUNT, fingerprint=FP)
    try:
        # The file lives on hugetlbfs and took whole huge pages from the reservation.
        assert os.statvfs(path).f_bsize == hugetlbfs.page_size()
        assert os.path.getsize(path) % hugetlbfs.page_size() == 0
        assert hugetlbfs.free_pages() < free_before
        keys = [key(i) for i in range(COUNT)]
        assert pool.put(keys, [block_for(k, SLOT) for k in keys]).stored == COUNT
        # Another process attaches and reads every block back intact.
        code = (
            "import sys\n"
            "from kvpool import KVPool\n"
            "from tests.kvpool.conftest import FP, block_for, key\n"
            f"p = KVPool.attach({str(path)!r}, fingerprint=FP, slot_size={SLOT})\n"
            f"keys = [key(i) for i in range({COUNT})]\n"
            "got = p.get(keys)\n"
            f"sys.exit(0 if [g == block_for(k, {SLOT}) for k, g in zip(keys, got)] "
            f"== [True] * {COUNT} else 1)\n"
        )
        res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert pool.stats().bytes_out == COUNT * SLOT  # counted in the shared header
    finally:
        pool.close()
        path.unlink()
    assert hugetlbfs.free_pages() == free_before  # unlinking gave the pages back


def test_find_mount_refuses_more_than_the_free_pages() -> None:
    too_much = (hugetlbfs.free_pages() + 1) * max(hugetlbfs.page_size(), 1)
    assert hugetlbfs.find_mount(too_much) is None


def test_temporary_mount_undoes_the_reservation() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    before = int(hugetlbfs.NR_HUGEPAGES.read_text())
    try:
        with hugetlbfs.temporary_mount(4 * 1024 * 1024) as mount:
            assert mount in hugetlbfs.mounts()
            assert int(hugetlbfs.NR_HUGEPAGES.read_text()) == before + 2
    except PoolIOError as exc:
        pytest.skip(str(exc))
    assert int(hugetlbfs.NR_HUGEPAGES.read_text()) == before
    assert mount not in hugetlbfs.mounts() and not mount.exists()
