"""Fixtures shared by more than one test package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server for one test (tests may stop and start it: an outage)."""
    s = RedisServer().start()
    yield s
    s.stop()
