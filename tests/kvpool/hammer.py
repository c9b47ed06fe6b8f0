"""A pool client for the stress and crash tests: random put / lookup / get / remove on a
key space, checking every loaded byte against content derived from its key.

    python -m tests.kvpool.hammer PATH SEED OPS KEYSPACE     (OPS 0: until killed)
Prints "ready" once attached, then one JSON line {"ops", "loads", "torn", "stored"};
exits 1 if anything was torn.
"""

from __future__ import annotations

import json
import random
import sys

from kvpool import KVPool
from tests.kvpool.blocks import FP, block_for, key


def main(path: str, seed: int, ops: int, keyspace: int) -> int:
    rng = random.Random(seed)
    pool = KVPool.attach(path, fingerprint=FP)
    size = pool.slot_size
    print("ready", flush=True)
    loads = torn = stored = 0
    i = 0
    while ops == 0 or i < ops:
        i += 1
        start = rng.randrange(keyspace)
        keys = [key((start + j) % keyspace) for j in range(rng.randint(1, 6))]
        op = rng.random()
        if op < 0.4:
            # lengths vary per key, so a misplaced block is caught too
            blocks = [block_for(k, size - (k[0] % 4) * 64) for k in keys]
            stored += pool.put(keys, blocks).stored
        elif op < 0.85:
            with pool.pinned(keys) as slots:
                for k, slot in zip(keys, slots, strict=False):
                    n = pool.slot_length(slot)
                    buf = bytearray(n)
                    pool.read(slot, buf)
                    loads += 1
                    if bytes(buf) != block_for(k, size - (k[0] % 4) * 64):
                        torn += 1
        elif op < 0.95:
            pool.lookup_prefix(keys)
        else:
            pool.remove(keys[0])
    pool.close()
    print(json.dumps({"ops": i, "loads": loads, "torn": torn, "stored": stored}))
    return 1 if torn else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
