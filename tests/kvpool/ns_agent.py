"""One simulated host's pool client for tests/kvpool/test_namespaces.py.

    python -m tests.kvpool.ns_agent PATH
Attaches the pool (coherence="flush"), prints {"ready": pid} with its pid as its own pid
namespace sees it, then runs one command per stdin line and answers one JSON line each:
    put A B          store keys A..B-1 (content derived from the key)
    get A B          {"got": n, "bad": m}: the prefix returned and how many bytes differ
    pin A B          pin keys A..B-1 and keep them pinned
    lock             take the pool lock and keep it (the test then kills this process)
    try A B T        lookup with a lock timeout of T seconds: {"n": ...} or {"error": kind}
    stats            the pool's statistics
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from kvpool import KVPool, PoolError
from tests.kvpool.blocks import FP, block_for, key


def answer(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def main(path: str) -> int:
    pool = KVPool.attach(path, fingerprint=FP, coherence="flush")
    size = pool.slot_size
    answer({"ready": os.getpid()})
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd in ("put", "get", "pin", "try"):
            keys = [key(i) for i in range(int(args[0]), int(args[1]))]
        if cmd == "put":
            answer({"stored": pool.put(keys, [block_for(k, size) for k in keys]).stored})
        elif cmd == "get":
            blocks = pool.get(keys)
            bad = sum(b != block_for(k, size) for k, b in zip(keys, blocks, strict=False))
            answer({"got": len(blocks), "bad": bad})
        elif cmd == "pin":
            answer({"pinned": len(pool.pin(keys))})
        elif cmd == "lock":
            answer({"locked": bool(pool._p.debug_lock())})
        elif cmd == "try":
            pool.set_lock_timeout(float(args[2]))
            try:
                answer({"n": pool.lookup_prefix(keys)})
            except PoolError as exc:
                answer({"error": type(exc).__name__})
            pool.set_lock_timeout(5.0)
        elif cmd == "stats":
            answer(dataclasses.asdict(pool.stats()))
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
