"""What the kvpool tests store, importable without pytest (child processes import it): the
model fingerprint, block keys, and block content derived from its key (so any torn,
misplaced or scribbled block is detectable by whoever reads it); and a small tmpfs to run
a filesystem out of space."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FP = hashlib.sha256(b"test-model").digest()


def key(i: int) -> bytes:
    return hashlib.sha256(b"key-%d" % i).digest()


def block_for(k: bytes, size: int) -> bytes:
    """Content derived from the key: any torn or misplaced block is detectable."""
    seed = hashlib.sha256(b"content" + k).digest()
    return (seed * (size // 32 + 1))[:size]


@contextmanager
def small_tmpfs(where: Path, size: str = "16m") -> Iterator[Path | None]:
    """A tmpfs of `size` mounted at `where` (created) for the block; None where it cannot
    be mounted (not root, no mount(8)). Unmounted afterwards."""
    where.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
