"""The CPU copy path on a KV-sized load, one or more checkouts side by side.

    python bench/cpu_copy.py [--rounds 3] [--json OUT.json] CHECKOUT [CHECKOUT...]

The shape is the cross-worker bench's float32 load (bench/README.md, Cross-worker TTFT):
93 blocks of 60 segments of 24,576 bytes (137 MB) between a paged "engine" cache (numpy,
already written, as vLLM's torch.zeros cache is) and pool slots on /dev/shm, one thread.
Each checkout (a directory with its built beluga_native) runs in its own process, in turn,
`--rounds` times; per checkout the medians of 7 gathers (save, with checksums) and 7 scatters
(load, verified) per round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEG, NSEG, BLOCKS, ENGINE_BLOCKS, REPEAT = 24576, 60, 93, 200, 7


def child(checkout: str) -> dict[str, float]:
    import numpy as np

    sys.path.insert(0, checkout)
    from kvpool import KVPool

    rng = np.random.default_rng(1)
    layers = [rng.integers(0, 256, (ENGINE_BLOCKS, SEG), dtype=np.uint8) for _ in range(NSEG)]
    segs = [(int(layer.ctypes.data), SEG, SEG) for layer in layers]
    ids = [int(i) for i in rng.permutation(ENGINE_BLOCKS)[:BLOCKS]]
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(BLOCKS)]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d, \
            KVPool.create(Path(d) / "p.pool", slot_size=SEG * NSEG, slot_count=BLOCKS,
                          fingerprint=hashlib.sha256(b"cpu-copy").digest()) as pool:
        slots = [r.slot for r in pool.prepare_store(keys)]
        gather, scatter = [], []
        for _ in range(REPEAT):
            t0 = time.perf_counter()
            sums = pool.gather(slots, ids, segs, 1)
            gather.append(time.perf_counter() - t0)
        pool.complete_store(slots, [SEG * NSEG] * BLOCKS, checksums=sums)
        with pool.pinned(keys) as pinned:
            for _ in range(REPEAT):
                t0 = time.perf_counter()
                failed = pool.scatter(pinned, ids, segs, 1)
                scatter.append(time.perf_counter() - t0)
                assert failed == [], failed
    return {"gather_ms": statistics.median(gather) * 1e3,
            "scatter_ms": statistics.median(scatter) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="*")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if not args.checkouts:
        ap.error("name at least one checkout (e.g. .)")
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in args.checkouts}
    for _ in range(args.rounds):
        for c in args.checkouts:
            out = subprocess.run([sys.executable, __file__, "--child", str(Path(c).resolve())],
                                 check=True, capture_output=True, text=True).stdout
            runs[c].append(json.loads(out))
            print(c, runs[c][-1], flush=True)
    summary: dict[str, Any] = {
        c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    summary["mb"] = BLOCKS * NSEG * SEG / 1e6
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
