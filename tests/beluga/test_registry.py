from __future__ import annotations

import json

from beluga.registry import SCHEMA_VERSION, WorkerRecord, parse_record, worker_key


def make_record(**over: object) -> WorkerRecord:
    data: dict[str, object] = {"schema": SCHEMA_VERSION, "id": "w1", "url": "http://h:1",
                               "model": "m", "capacity": 4, "pid": 10, "started_at": 1.0,
                               "heartbeat_at": 2.0}
    data.update(over)
    return WorkerRecord.model_validate(data)


def test_record_round_trips() -> None:
    rec = make_record(running=2, waiting=1)
    assert json.loads(rec.to_json())["schema"] == SCHEMA_VERSION
    assert parse_record(rec.to_json()) == rec
    assert parse_record(rec.to_json().encode()) == rec


def test_foreign_or_broken_records_are_skipped() -> None:
    good = json.loads(make_record().to_json())
    assert parse_record(b"not json") is None
    assert parse_record(b"[1, 2]") is None
    assert parse_record(json.dumps({**good, "schema": SCHEMA_VERSION + 1})) is None
    assert parse_record(json.dumps({**good, "capacity": 0})) is None
    assert parse_record(json.dumps({k: v for k, v in good.items() if k != "url"})) is None


def test_keys_are_namespaced() -> None:
    assert worker_key("beluga:v1", "a:1") == "beluga:v1:worker:a:1"
