"""hugetlbfs backings: find a mount with room for a pool, or make one for a test or benchmark.

A pool file on hugetlbfs is mapped with 2 MiB pages (no TLB walk per 4 KiB, which is what
holds /dev/shm below anonymous-memory memcpy where shmem THP is off). Pages must be reserved
by the administrator (`vm.nr_hugepages`) and a hugetlbfs mounted; `temporary_mount` does both
for the duration of a block and undoes them, as root only.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvpool.errors import PoolIOError

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")


def page_size() -> int:
    """The default huge page size in bytes (0 if the kernel has none)."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    return 0


def free_pages() -> int:
    """Default-size huge pages reserved and not in use, system-wide."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def mounts() -> list[Path]:
    """Mount points of hugetlbfs file systems of the default page size."""
    default = page_size()
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "hugetlbfs":
            opts = dict(o.partition("=")[::2] for o in fields[3].split(","))
            size = opts.get("pagesize", "")
            if not size or _parse_size(size) == default:
                out.append(Path(fields[1]))
    return out


def find_mount(nbytes: int) -> Path | None:
    """A hugetlbfs mount (default page size) if enough free pages remain for `nbytes`."""
    ps = page_size()
    if ps == 0 or free_pages() * ps < nbytes:
        return None
    found = [m for m in mounts() if os.access(m, os.W_OK)]
    return found[0] if found else None


@contextmanager
def temporary_mount(nbytes: int) -> Iterator[Path]:
    """Reserve enough extra huge pages for `nbytes`, mount a private hugetlbfs, and undo both
    on exit. Root only; raises PoolIOError when the kernel will not give the pages."""
    ps = page_size()
    if ps == 0:
        raise PoolIOError("this kernel has no huge pages")
    if os.geteuid() != 0:
        raise PoolIOError("reserving huge pages needs root")
    need = -(-nbytes // ps)
    before = int(NR_HUGEPAGES.read_text())
    try:
        NR_HUGEPAGES.write_text(str(before + need))
    except OSError as exc:
        raise PoolIOError(f"cannot reserve huge pages: {exc}") from None
    mount = Path(tempfile.mkdtemp(prefix="beluga-huge-"))
    mounted = False
    try:
        if free_pages() < need:
            raise PoolIOError(f"asked for {need} more huge pages, the kernel has "
                              f"{free_pages()} free (memory fragmented or limited)")
        res = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"mode=0700,pagesize={ps}",
                              "none", str(mount)], capture_output=True, text=True)
        if res.returncode != 0:
            raise PoolIOError(f"mount hugetlbfs failed: {res.stderr.strip()}")
        mounted = True
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)
        mount.rmdir()
        NR_HUGEPAGES.write_text(str(before))


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)
