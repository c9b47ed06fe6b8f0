from __future__ import annotations

import pytest

from beluga.registry import WorkerRecord
from gateway.policies import POLICIES, RequestInfo, make_policy
from gateway.workers import WorkerState

REQ = RequestInfo(model="m", endpoint="chat", stream=False)


def make_worker(wid: str, running: int = 0, waiting: int = 0, in_flight: int = 0,
                capacity: int = 8) -> WorkerState:
    rec = WorkerRecord.model_validate({
        "schema": 1, "id": wid, "url": f"http://{wid}", "model": "m", "capacity": capacity,
        "pid": 1, "started_at": 0.0, "heartbeat_at": 0.0, "running": running,
        "waiting": waiting})
    return WorkerState(record=rec, in_flight=in_flight)


def test_least_loaded_picks_the_emptiest_worker() -> None:
    policy = make_policy("least_loaded")
    workers = [make_worker("a", running=3), make_worker("b", running=1),
               make_worker("c", in_flight=2)]
    choice = policy.select(workers, REQ)
    assert choice is not None and choice.worker.id == "b" and choice.reason == "least_loaded"


def test_load_is_relative_to_capacity_and_counts_the_queue() -> None:
    policy = make_policy("least_loaded")
    big = make_worker("big", running=4, capacity=32)
    small = make_worker("small", running=2, capacity=4)
    queued = make_worker("queued", running=0, waiting=5, capacity=32)
    choice = policy.select([small, big, queued], REQ)
    assert choice is not None and choice.worker.id == "big"


def test_a_report_older_than_our_last_completion_is_ignored() -> None:
    policy = make_policy("least_loaded")
    stale = make_worker("a", running=1)  # heartbeat_at=0.0: sampled before...
    stale.begin()
    stale.done()  # ...this request finished, so its "running=1" is that request
    busy = make_worker("b", running=1)
    choice = policy.select([busy, stale], REQ)
    assert choice is not None and choice.worker.id == "a"
    assert stale.in_flight == 0 and stale.load() == 0


def test_ties_rotate() -> None:
    policy = make_policy("least_loaded")
    workers = [make_worker("a"), make_worker("b")]
    picks = []
    for _ in range(4):
        choice = policy.select(workers, REQ)
        assert choice is not None
        picks.append(choice.worker.id)
    assert picks == ["a", "b", "a", "b"]


def test_no_workers_means_no_choice() -> None:
    assert make_policy("least_loaded").select([], REQ) is None


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")
    assert "least_loaded" in POLICIES
