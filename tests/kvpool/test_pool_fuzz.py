"""Fuzzing the pool file as a test (issue 17): a short fixed-seed run of the harness in
tests/kvpool/pool_fuzz.py. Random bytes go over every region of a live pool while operator
processes use it; no process may crash, no call may pass its bound, no block may come back
different from what its key's writer stored, no exception may escape untyped, and a fresh
process must be able to use the pool afterwards or refuse it with a typed error.

The long run is `python bench/fuzz_pool.py --minutes 30` (bench/README.md).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.kvpool.pool_fuzz import (
    CLASSES,
    FuzzConfig,
    Op,
    Operator,
    Tally,
    _classify_exit,
    content,
    fuzz_key,
    plan,
    run_fuzz,
)

SEED = 1717
# Two epochs (one of them also scribbles the attach-checked header near its end).
CONFIG = FuzzConfig(seed=SEED, procs=3, epoch_s=8.0, scribble_hz=12.0, kill_hz=0.4,
                    lock_timeout_s=1.0)
EPOCHS = 2


def _report(summary: dict[str, Any]) -> str:
    lines = [f"classes {summary['classes']}; failing epoch seeds "
             f"{summary['failing_epoch_seeds']}; replay one with "
             "`python bench/fuzz_pool.py --epoch-seed N`"]
    findings = summary.get("findings", [])
    if len(findings) > 8:
        lines.append(f"(the first 8 of {len(findings)} findings kept)")
    for f in findings[:8]:
        head = {k: v for k, v in f.items()
                if k not in ("stack", "log", "traceback", "recent_scribbles")}
        lines.append(json.dumps(head))
        for s in f.get("recent_scribbles", [])[-4:]:
            lines.append(f"    after scribble {s}")
        text = f.get("stack") or f.get("traceback") or f.get("log") or ""
        lines += ["    " + line for line in text.strip().splitlines()[-12:]]
    return "\n".join(lines)


def test_scribbled_pool_never_crashes_hangs_or_returns_a_wrong_block() -> None:
    result = run_fuzz(CONFIG, epochs=EPOCHS)
    s = result.summary()
    report = _report(s)
    assert {c: s["classes"][c] for c in CLASSES} == {c: 0 for c in CLASSES}, report
    assert not [f for f in s["findings"] if f["class"] == "harness"], report
    # It did something: operations of every kind, and scribbles over the pool.
    assert sum(s["ops"].values()) > 500, report
    assert {"put", "get", "pin_scatter", "gather_store", "lookup"} <= set(s["ops"]), report
    assert sum(s["scribbles"].values()) > 40, report
    # After the scribbling: a fresh process used the pool, or was refused with a type.
    assert sum(s["recovery"].values()) == EPOCHS, report
    for outcome in s["recovery"]:
        assert outcome.startswith(("usable", "degraded", "refused at")), report


def test_a_seed_draws_the_same_operations_and_scribbles() -> None:
    assert plan(SEED, CONFIG, 50) == plan(SEED, CONFIG, 50)
    assert plan(SEED, CONFIG, 50) != plan(SEED + 1, CONFIG, 50)


class _FakePool:
    """Stands in for a KVPool to check that the harness counts what it must."""

    def __init__(self, blocks: list[bytes] | None = None, exc: Exception | None = None):
        self.blocks, self.exc = blocks or [], exc

    def get(self, keys: list[bytes]) -> list[bytes]:
        if self.exc is not None:
            raise self.exc
        return self.blocks


def test_the_harness_counts_each_class(tmp_path: Path) -> None:
    import kvpool

    spec = {"path": str(tmp_path / "none.pool"), "slot_size": 4096, "slot_count": 8,
            "keyspace": 16, "lock_timeout_s": 1.0, "margin_s": 5.0, "seed": 1,
            "badargs": True, "stop": str(tmp_path / "STOP"),
            "result": str(tmp_path / "r.json"), "hang": str(tmp_path / "hang"),
            "watchdog": False}
    op = Operator(spec)
    get = Op("get", 0, 2, 0.5, 0, 1)
    k0, k1 = fuzz_key(0), fuzz_key(1)
    cases: list[tuple[_FakePool, str]] = [
        (_FakePool([content(k0, 4096), content(k1, 4096)]), ""),          # right blocks
        (_FakePool([content(k0, 4096)[:-1] + b"x"]), "wrong"),           # one byte off
        (_FakePool([content(k1, 4096)]), "wrong"),                       # another key's
        (_FakePool(exc=kvpool.PoolBusyError("busy")), "get PoolBusyError"),
        (_FakePool(exc=MemoryError()), "escape"),
    ]
    for fake, want in cases:
        before = Tally.from_json(op.tally.to_json())
        op.pool = fake
        with op.bounded("get"):
            op.op_get(get)
        if want in CLASSES:
            assert op.tally.classes[want] == before.classes[want] + 1, want
        elif want:
            assert op.tally.errors[want] == before.errors[want] + 1, want
        else:
            assert op.tally.failures() == before.failures()
    # How processes ended: a signal we did not send is a crash, one we sent is not.
    files = {k: tmp_path / f"x.{k}" for k in ("result", "hang", "crash", "log")}
    t = Tally()
    assert _classify_exit(t, -signal.SIGSEGV, files, set(), "p", [], 1).startswith("crash")
    assert _classify_exit(t, -signal.SIGKILL, files, {signal.SIGKILL}, "p", [], 1) \
        == "killed (SIGKILL, sent)"
    files["hang"].write_text("Timeout (0:00:09)!\n")
    assert _classify_exit(t, 1, files, set(), "p", [], 1) == "hang (watchdog)"
    assert (t.classes["crash"], t.classes["hang"]) == (1, 1)
