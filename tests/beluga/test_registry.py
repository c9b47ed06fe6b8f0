"""Registry and hints records: Redis is untrusted input, so every field's worst values are
refused (table-driven: each hostile value alone in an otherwise valid record), and the edge
values a real worker may publish are accepted."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import pytest

from beluga.registry import (
    HINTS_SCHEMA_VERSION,
    MAX_RECORD_BYTES,
    REASONS,
    SCHEMA_VERSION,
    HintsRecord,
    InvalidRecord,
    InvalidRecords,
    WorkerRecord,
    check_pool_path,
    check_worker_url,
    load_hints,
    load_worker,
    parse_hints,
    parse_record,
    redacted_url,
    valid_hint_keys,
    worker_key,
)

NAN, INF = float("nan"), float("inf")
POOL_UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0fabcdef01"
GOOD_WORKER: dict[str, Any] = {
    "schema": SCHEMA_VERSION, "id": "w1", "url": "http://h:1", "model": "m", "capacity": 4,
    "pid": 10, "started_at": 1.0, "heartbeat_at": 2.0, "running": 0, "waiting": 0}
GOOD_HINTS: dict[str, Any] = {
    "schema": HINTS_SCHEMA_VERSION, "worker_id": "w1", "fingerprint": "ab" * 32,
    "block_tokens": 16, "pool_uuid": POOL_UUID, "pool_path": "/dev/shm/b.pool",
    "keys": 3, "updated_at": 1.7e9}
DIRS = "/dev/shm,/dev/hugepages"

BAD_INTS = [1.5, "4", True, None, NAN, INF, -INF, 1e308, [4], {"n": 4}]
BAD_TIMES = [NAN, INF, -INF, -1.0, -1e308, 1e308, 1e11 + 1, "1", True, None, [1.0]]
BAD_IDS = ["", " ", "a b", "a\nb", "a\rb", "a\r\nx-evil: 1", "a\x00", "a\x7f", "a\tb", "é",
           "w\u2028", "x" * 201, 5, None, True, ["w1"]]

BAD_ADAPTER_NAMES: list[Any] = [["a", "a"], ["a b"], [""], ["x" * 101], ["a/b"], [1],
                                 "sql", {"sql": 1}, [f"a{i}" for i in range(65)], None]
HOSTILE_WORKER: dict[str, list[Any]] = {
    "adapters": BAD_ADAPTER_NAMES,
    "url": [
        "file:///etc/passwd", "ftp://h:21", "gopher://h:70", "javascript:alert(1)",
        "redis://h:6379", "HTTP://h:1", "http:/h:1", "http//h:1", "//h:1", "h:1", "http://",
        "http://:80", "http://h:0", "http://h:00000", "http://h:65536", "http://h:99999",
        "http://h:-1", "http://h:1a", "http://h:+1", "http://h: 1", "http://h:1:2",
        "http://a b:1", "http://h:1/\r\nX: y", "http://h\r\nX: y:1", "http://h:1\n",
        "http://h:1\r", "\nhttp://h:1", " http://h:1", "http://h:1 ", "http://h\t:1",
        "http://h\x00:1", "http://h:1/\x00", "http://h:1/path", "http://h:1/v1/", "http://h:1//",
        "http://h:1?q=1", "http://h:1/?q", "http://h:1#f", "http://u:p@h:1", "http://u@h:1",
        "http://@h:1", "http://h%0d%0a:1", "http://h:1/%0d%0aX", "http://\u00e9t\u00e9:1",
        "http://h\u2028:1", "http://[::1:1", "http://[zz::1]:1", "http://[::1]x:1",
        "http://[fe80::1%25eth0]:1", "http://-h:1", "http://.h:1", "http://h/../x",
        "http://" + "a" * 600, "", 1234, None, True, ["http://h:1"], {"u": "http://h:1"}],
    "id": BAD_IDS,
    "model": ["", " m", "m ", "m\n", "m\r\nx-evil: 1", "m\x00", "m\x1b[31m", "m\u2028",
              "m\u200b", "x" * 257, 5, None, True, ["m"]],
    "capacity": [0, -1, 100_001, 2**63, *BAD_INTS],
    "pid": [-1, 2**22 + 1, 2**64, *BAD_INTS],
    "running": [-1, 10**7 + 1, *BAD_INTS],
    "waiting": [-1, 10**7 + 1, *BAD_INTS],
    "started_at": BAD_TIMES,
    "heartbeat_at": BAD_TIMES,
    "schema": [0, 2, "1", True, 1.0, None],
}

VALID_WORKER: dict[str, list[Any]] = {
    "adapters": [[], ["sql"], ["a.b_c-1", "x" * 100], [f"a{i}" for i in range(64)]],
    "url": ["http://h", "https://h", "http://h:1", "http://h:65535", "https://h:443",
            "http://127.0.0.1:8100", "http://[::1]:8100", "http://worker_1.svc-x.local:80",
            "http://" + "a" * 253 + ":1"],
    "id": ["a", "x" * 200, "127.0.0.1:8100", "~!@#$%^&*()[]{}", "w-1_2.3"],
    "model": ["m", "x" * 256, "org/name-1.5B", "a b", "Модель", "smollm2-135m-instruct"],
    "capacity": [1, 100_000],
    "pid": [0, 2**22],
    "running": [0, 10**7],
    "waiting": [0, 10**7],
    "started_at": [0, 0.0, 1e11, time.time()],
    "heartbeat_at": [0, 0.0, 1e11, time.time()],
}

HOSTILE_HINTS: dict[str, list[Any]] = {
    "adapters": [{"a b": "0" * 64}, {"sql": "0" * 63}, {"sql": "G" * 64}, {"sql": "A" * 64},
                 {"sql": "0" * 64 + "\n"}, {"sql": 5}, ["sql"], "sql", None,
                 {f"a{i}": "0" * 64 for i in range(65)}],
    "worker_id": BAD_IDS,
    "fingerprint": ["", "a" * 63, "a" * 65, "A" * 64, "g" * 64, "a" * 64 + "\n",
                    " " + "a" * 63, 5, None, ["a" * 64]],
    "block_tokens": [0, -1, 1025, 2**40, *BAD_INTS],
    "pool_uuid": ["u-1", "", "not-a-uuid", POOL_UUID.upper(),
                  POOL_UUID.replace("-", ""), "{" + POOL_UUID + "}",
                  POOL_UUID + "\n", "urn:uuid:" + POOL_UUID,
                  POOL_UUID + "0", 5, True, [POOL_UUID]],
    "keys": [-1, 10**7 + 1, *BAD_INTS],
    "updated_at": BAD_TIMES,
    "schema": [0, 2, "1", True, 1.0, None],
}

VALID_HINTS: dict[str, list[Any]] = {
    "adapters": [{}, {"sql": "0" * 64}, {f"a{i}": "f" * 64 for i in range(64)}],
    "worker_id": ["a", "x" * 200, "127.0.0.1:8100"],
    "block_tokens": [1, 16, 1024],
    "pool_uuid": [None, str(uuid.UUID(int=0)), str(uuid.uuid4())],
    "keys": [0, 10**7],
    "updated_at": [0, 1e11, time.time()],
    "pool_path": [None, "/dev/shm/b.pool", "/dev/hugepages/a/b.pool",
                  "/dev/shm/odd [place]/p.pool", "/dev/shm/" + "a" * 200],
}

BAD_POOL_PATHS = [
    "/etc/passwd", "/dev/shm/../etc/x", "/dev/shm/./x", "/dev/shm/x/..", "/dev/shm//x",
    "//dev/shm/x", "dev/shm/x", "./dev/shm/x", "x", "", "/dev/shm", "/dev/shm/",
    "/dev/shmx/y", "/dev/sh", "/dev/shm/x\x00", "/dev/shm/x\n", "/dev/shm/\r\nx",
    "/dev/shm/x\x1b", "/dev/shm/" + "a" * 5000, "/proc/self/mem", "/dev/sda", 5, True,
    ["/dev/shm/x"], {"p": 1}]


PLACES = {"/etc/passwd", "/proc/self/mem", "/dev/sda", "/dev/shm", "/dev/sh", "/dev/shmx/y"}


def cases(table: dict[str, list[Any]]) -> list[Any]:
    return [pytest.param(field, value, id=f"{field}={value!r:.40}")
            for field, values in table.items() for value in values]


def make_record(**over: object) -> WorkerRecord:
    return WorkerRecord.model_validate({**GOOD_WORKER, **over})


@pytest.mark.parametrize(("field", "value"), cases(HOSTILE_WORKER))
def test_each_hostile_worker_field_is_refused(field: str, value: Any) -> None:
    raw = json.dumps({**GOOD_WORKER, field: value})
    with pytest.raises(InvalidRecord) as info:
        load_worker(raw)
    assert info.value.reason == field and info.value.reason in REASONS
    assert parse_record(raw) is None and parse_record(raw.encode()) is None
    with pytest.raises(ValueError):  # a worker cannot publish it either
        WorkerRecord.model_validate({**GOOD_WORKER, field: value})


@pytest.mark.parametrize(("field", "value"), cases(VALID_WORKER))
def test_each_worker_edge_value_is_accepted(field: str, value: Any) -> None:
    rec = load_worker(json.dumps({**GOOD_WORKER, field: value}).encode())
    assert getattr(rec, field) == value


def test_a_trailing_slash_is_normalized_away() -> None:
    assert load_worker(json.dumps({**GOOD_WORKER, "url": "http://h:1/"})).url == "http://h:1"
    assert check_worker_url("https://h/") == "https://h"


@pytest.mark.parametrize(("field", "value"), cases(HOSTILE_HINTS))
def test_each_hostile_hints_field_is_refused(field: str, value: Any) -> None:
    raw = json.dumps({**GOOD_HINTS, field: value})
    with pytest.raises(InvalidRecord) as info:
        load_hints(raw, DIRS)
    assert info.value.reason == field and info.value.reason in REASONS
    assert parse_hints(raw) is None


@pytest.mark.parametrize(("field", "value"), cases(VALID_HINTS))
def test_each_hints_edge_value_is_accepted(field: str, value: Any) -> None:
    rec, dropped = load_hints(json.dumps({**GOOD_HINTS, field: value}), DIRS)
    assert getattr(rec, field) == value and dropped is None


@pytest.mark.parametrize("path", BAD_POOL_PATHS, ids=lambda p: f"{p!r:.40}")
def test_a_bad_pool_path_drops_only_the_path(path: Any) -> None:
    rec, dropped = load_hints(json.dumps({**GOOD_HINTS, "pool_path": path}), DIRS)
    assert rec.pool_path is None and dropped  # the rest of the record still routes
    assert rec.pool_uuid == GOOD_HINTS["pool_uuid"] and rec.fingerprint == "ab" * 32
    if isinstance(path, str):
        assert check_pool_path(path, DIRS.split(",")) is not None
        if path not in PLACES:  # absolute and normalized, even where "/" is allowed
            assert check_pool_path(path, ["/"]) is not None
            with pytest.raises(ValueError):
                HintsRecord.model_validate({**GOOD_HINTS, "pool_path": path})


def test_pool_search_dirs_are_read_like_the_setting() -> None:
    assert check_pool_path("/mnt/huge/p.pool", " /mnt/huge/ , relative, ") is None
    assert check_pool_path("/mnt/huge/p.pool", "relative,/dev/shm") is not None
    assert check_pool_path("/dev/shm/p.pool", "") is not None  # nothing allowed: nothing


WHOLE_VALUES: list[tuple[Any, str]] = [
    (b"not json", "not_json"),
    (b"\xff\xfe\x00garbage", "not_json"),            # not UTF-8
    (b"{\"schema\": 1, \"id\": \"\xff\"}", "not_json"),
    (b"[" * 10_000, "not_json"),                     # nested deeper than Python's recursion
    (b"{\"a\":" * 2500 + b"1" + b"}" * 2500, "not_json"),
    (b"[" * 100_000, "too_large"),                   # read only MAX_RECORD_BYTES anyway
    (b"x" * (1 << 20), "too_large"),
    (json.dumps({**GOOD_WORKER, "model": "m" * (1 << 20)}), "too_large"),
    (b"{\"schema\": 1, \"capacity\": " + b"9" * 5000 + b"}", "not_json"),  # int digits limit
    (b"[1, 2]", "not_object"), (b"\"text\"", "not_object"), (b"null", "not_object"),
    (b"1e999", "not_object"), (b"{}", "schema"), (b"{\"schema\": true}", "schema"),
    (b"", "not_json"), (None, "wrong_type"), (12, "wrong_type"), ([b"a"], "wrong_type"),
]


@pytest.mark.parametrize(("raw", "reason"), WHOLE_VALUES, ids=lambda v: f"{v!r:.30}")
def test_hostile_values_as_a_whole_are_refused(raw: Any, reason: str) -> None:
    for load in (load_worker, lambda r: load_hints(r, DIRS)):
        with pytest.raises(InvalidRecord) as info:
            load(raw)
        assert info.value.reason == reason


def test_record_round_trips() -> None:
    rec = make_record(running=2, waiting=1)
    assert json.loads(rec.to_json())["schema"] == SCHEMA_VERSION
    assert parse_record(rec.to_json()) == rec
    assert parse_record(rec.to_json().encode()) == rec
    hints = HintsRecord.model_validate(GOOD_HINTS)
    assert load_hints(hints.to_json(), DIRS) == (hints, None)


def test_foreign_or_broken_records_are_skipped() -> None:
    good = json.loads(make_record().to_json())
    assert parse_record(b"not json") is None
    assert parse_record(b"[1, 2]") is None
    assert parse_record(json.dumps({**good, "schema": SCHEMA_VERSION + 1})) is None
    assert parse_record(json.dumps({**good, "capacity": 0})) is None
    assert parse_record(json.dumps({k: v for k, v in good.items() if k != "url"})) is None


def test_keys_are_namespaced() -> None:
    assert worker_key("beluga:v1", "a:1") == "beluga:v1:worker:a:1"


def test_only_32_lowercase_hex_members_are_hint_keys() -> None:
    good = "0123456789abcdef" * 2
    members: list[object] = [good.encode(), good, good.upper().encode(), good[:-1].encode(),
                             (good + "0").encode(), (good + "\n").encode(), b"\xff" * 32,
                             b"", b"g" * 32, b"x" * (1 << 20), 5, None]
    keys, bad = valid_hint_keys(members)
    assert keys == {good} and bad == len(members) - 2


def test_invalid_records_are_logged_once_and_always_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    counted: list[tuple[str, str]] = []
    audit = InvalidRecords(count=lambda kind, reason: counted.append((kind, reason)),
                           remember=3)
    caplog.set_level(logging.WARNING, logger="beluga.registry")
    for _ in range(5):
        audit.report("worker", b"k:1", "url", "bad")
        audit.report("worker", b"k:1", "capacity")
        audit.report("hints", b"k:1", "url")
    assert len(counted) == 15
    assert len([r for r in caplog.records if "k:1" in r.getMessage()]) == 3
    caplog.clear()
    for i in range(10):  # more distinct ones than remembered: counted, one line says so
        audit.report("worker", f"k:{i + 2}", "model")
    assert len(counted) == 25 and len(caplog.records) == 1
    assert "not logged" in caplog.records[0].getMessage()
    audit.report("worker", "k", "no such reason")
    assert counted[-1] == ("worker", "other")


def test_a_failing_counter_and_a_hostile_key_do_not_raise(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(kind: str, reason: str) -> None:
        raise RuntimeError("metrics bug")

    audit = InvalidRecords(count=broken)
    audit.report("worker", b"\xff\r\nX: y" + b"k" * 10_000, "url", "x" * 10_000)
    line = next(r.getMessage() for r in caplog.records if "invalid worker" in r.getMessage())
    assert "\r" not in line and "\n" not in line and len(line) < 600


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
    ("rediss://:p%40ss@h:6380/0?ssl_ca_certs=/ca.crt",
     "rediss://:***@h:6380/0?ssl_ca_certs=/ca.crt"),
    ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://user@h:6379", "redis://user@h:6379"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
])
def test_passwords_in_redis_urls_are_masked(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    assert "pw" not in redacted_url(url) and "p%40ss" not in redacted_url(url)


def test_the_byte_bound_is_a_few_records_long() -> None:
    assert 8192 <= MAX_RECORD_BYTES <= 65536
    assert len(make_record(model="m" * 256, id="i" * 200).to_json()) < MAX_RECORD_BYTES


@pytest.mark.parametrize("url", [
    "http://169.254.169.254", "http://169.254.169.254:80/", "http://[fd00:ec2::254]:80",
    "http://metadata.google.internal", "http://METADATA.google.internal.:80",
    "http://0.0.0.0:8100", "http://[::]:8100", "http://[::ffff:169.254.169.254]:1",
    "http://224.0.0.1:8100", "http://[fe80::1]:8100"])
def test_no_record_sends_traffic_to_a_metadata_service_or_a_non_address(url: str) -> None:
    from beluga.registry import check_worker_url

    with pytest.raises(ValueError):
        check_worker_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8100", "http://[::1]:8100",
                                 "https://worker-3.internal:443", "http://10.1.2.3:9000"])
def test_workers_on_loopback_private_and_named_hosts_are_fine(url: str) -> None:
    from beluga.registry import check_worker_url

    assert check_worker_url(url) == url
