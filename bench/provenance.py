"""What a benchmark run ran: the checkout's commit, and whether its tracked files differed
from it (a label a reader can check, written into each run's JSON)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """`<sha>`, `<sha>+changes` when tracked files differ from it, or `unknown` outside a
    git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=ROOT, capture_output=True, text=True, check=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+changes" if changed else sha
