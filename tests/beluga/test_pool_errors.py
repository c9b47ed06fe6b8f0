"""Pool errors by kind, logged once per kind per interval, and the busy backoff."""

from __future__ import annotations

import logging

import pytest

from beluga.pool_errors import KINDS, BusyBackoff, PoolErrorLog, error_kind
from kvpool import errors as E


def test_every_pool_error_class_has_its_own_kind() -> None:
    classes = [c for c in vars(E).values()
               if isinstance(c, type) and issubclass(c, E.PoolError) and c is not E.PoolError]
    kinds = {error_kind(c("x")) for c in classes}
    assert len(kinds) == len(classes) and "other" not in kinds
    assert kinds | {"other"} == set(KINDS)
    assert error_kind(E.PoolError("x")) == "other"
    assert error_kind(E.from_native(type("N", (Exception,), {"kind": 8})("x"))) == "busy"


def test_the_log_says_each_kind_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    counted: list[str] = []
    log = PoolErrorLog(logging.getLogger("t"), "here", counted.append, every_s=60,
                       clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        for _ in range(5):
            assert log.report(E.PoolBusyError("held"), "doing it") == "busy"
        log.report(E.PoolCorruptError("bad"), "doing it")
        now[0] += 61
        log.report(E.PoolBusyError("held"), "doing it")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["here: pool busy error doing it: held",
                     "here: pool corrupt error doing it: bad",
                     "here: pool busy error doing it: held (4 more since the last such line)"]
    assert counted == ["busy"] * 5 + ["corrupt", "busy"]
    assert log.counts == {"busy": 6, "corrupt": 1}


def test_only_a_busy_lock_backs_off() -> None:
    now = [0.0]
    b = BusyBackoff(2.0, clock=lambda: now[0])
    b.note(E.PoolCorruptError("x"))
    assert not b.active()
    b.note(E.PoolBusyError("x"))
    assert b.active()
    now[0] = 2.01
    assert not b.active()
    assert not BusyBackoff(0.0).active()
