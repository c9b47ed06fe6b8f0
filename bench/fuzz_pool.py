"""The long fuzz run of the pool file (issue 17): random bytes over every region of live pools
while operator processes use them, for `--minutes`, in epochs (tests/kvpool/pool_fuzz.py).

    python bench/fuzz_pool.py --minutes 30 [--seed S] [--procs 3] [--json OUT]
    python bench/fuzz_pool.py --epoch-seed N [--epoch-seed M ...]     replay epochs

Each epoch is a fresh pool in /dev/shm (removed afterwards), `--procs` operators doing
random operations through kvpool.KVPool, a scribbler, SIGKILLs and SIGSTOPs, then a fresh
process that attaches, sweeps, puts and gets. Epoch seeds derive from `--seed` (default:
random, printed); every epoch with a finding is listed by class in the summary, and
`--epoch-seed` replays it (the same draws; the timing of the processes differs).

Prints one line per epoch, then a JSON summary: seeds, counts of operations, typed errors,
scribbles per region, signals, recovery outcomes, the four finding classes (crash, hang,
wrong block, untyped exception) and the first findings with their stacks and the scribbles
just before them. Exit status 1 when any finding was made.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kvpool.pool_fuzz import CLASSES, REGIONS, FuzzConfig, run_fuzz  # noqa: E402


def main() -> int:
    defaults = {f.name: f.default for f in fields(FuzzConfig)}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=0.0, help="run epochs this long")
    ap.add_argument("--epochs", type=int, default=0, help="or this many epochs")
    ap.add_argument("--seed", type=int, help="default: a random one (printed)")
    ap.add_argument("--epoch-seed", type=int, action="append", default=[],
                    help="replay these epochs (repeatable)")
    ap.add_argument("--procs", type=int, default=defaults["procs"])
    ap.add_argument("--epoch-s", type=float, default=30.0)
    ap.add_argument("--scribble-hz", type=float, default=defaults["scribble_hz"])
    ap.add_argument("--kill-hz", type=float, default=defaults["kill_hz"])
    ap.add_argument("--slot-count", type=int, default=defaults["slot_count"])
    ap.add_argument("--lock-timeout-s", type=float, default=defaults["lock_timeout_s"],
                    help="passed to attach/create where the API takes it")
    ap.add_argument("--region", action="append", choices=REGIONS, default=[],
                    help="scribble only these regions (repeatable; default all)")
    ap.add_argument("--no-badargs", action="store_true",
                    help="operators call with valid arguments only")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args()
    if not (args.minutes or args.epochs or args.epoch_seed):
        ap.error("give --minutes, --epochs or --epoch-seed")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 48)
    cfg = FuzzConfig(seed=seed, procs=args.procs, epoch_s=args.epoch_s,
                     scribble_hz=args.scribble_hz, kill_hz=args.kill_hz,
                     slot_count=args.slot_count, keyspace=2 * args.slot_count,
                     lock_timeout_s=args.lock_timeout_s, regions=tuple(args.region),
                     badargs=not args.no_badargs)
    print(f"pool fuzz: seed {seed}, {args.procs} operators, {args.epoch_s:g} s epochs",
          flush=True)
    result = run_fuzz(cfg, epochs=args.epochs, minutes=args.minutes,
                      epoch_seeds=args.epoch_seed, log=lambda s: print(s, flush=True))
    summary = result.summary()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    found = {c: summary["classes"][c] for c in CLASSES}
    print(f"epochs {summary['epochs']}, ops {sum(summary['ops'].values())}, scribbles "
          f"{sum(summary['scribbles'].values())}, findings {found}, recovery "
          f"{summary['recovery']} ({summary['wall_s']} s)")
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
