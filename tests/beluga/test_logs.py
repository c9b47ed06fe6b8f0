"""`--log-format json`: one JSON object per line whatever a record holds (a hostile model
name, newlines, an exception), the request id of the request being served on every record,
the format reaching `beluga up`'s children, and a bad BELUGA_LOG_FORMAT refused clearly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from beluga import logs
from beluga.logs import RequestContext, current_request

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure("INFO", "json")
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logs.configure.__globals__["_active"] = "text"


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines()]


def test_every_record_is_one_json_line(json_logs: None,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("beluga.test")
    hostile = 'm"odel\n{"level": "CRITICAL"}\r\u2028'
    log.info("routed %s", hostile, extra={"model": hostile, "status": 200, "ttft_s": 0.25})
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        log.exception("failed for %s", hostile)
    log.debug("not at INFO")
    out = lines(capsys)
    assert len(out) == 2
    first, second = out
    assert first["level"] == "INFO" and first["logger"] == "beluga.test"
    assert first["message"] == f"routed {hostile}" and first["model"] == hostile
    assert first["status"] == 200 and first["ttft_s"] == 0.25
    assert str(first["time"]).endswith("Z") and "request_id" not in first
    assert second["level"] == "ERROR" and "ValueError: boom" in str(second["exception"])


def test_records_made_while_serving_a_request_carry_its_id(
        json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    token = current_request.set(RequestContext("req-42"))
    try:
        logging.getLogger("gateway.test").warning("inside")
    finally:
        current_request.reset(token)
    logging.getLogger("gateway.test").warning("outside")
    inside, outside = lines(capsys)
    assert inside["request_id"] == "req-42"
    assert "request_id" not in outside


def test_text_lines_name_the_request_too(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        logs.configure("INFO", "text")
        token = current_request.set(RequestContext("req-7"))
        logging.getLogger("gateway.test").info("hello")
        current_request.reset(token)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
    assert capsys.readouterr().err.rstrip().endswith("INFO gateway.test: hello [request req-7]")


def beluga(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    return subprocess.run([sys.executable, "-m", "beluga_cli", *args], cwd=ROOT,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def test_the_command_logs_its_errors_as_json() -> None:
    r = beluga("--log-format", "json", "gateway", "--gateway-port", "0")
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "gateway_port" in str(record["message"])
    r = beluga("gateway", "--gateway-port", "0", env={"BELUGA_LOG_FORMAT": "json"})
    assert r.returncode == 2 and json.loads(r.stderr.splitlines()[0])["level"] == "ERROR"


def test_a_bad_log_format_is_refused_clearly() -> None:
    r = beluga("gateway", env={"BELUGA_LOG_FORMAT": "xml"})
    assert r.returncode == 2
    assert "BELUGA_LOG_FORMAT" in r.stderr and "Traceback" not in r.stderr
    r = beluga("--log-format", "xml", "gateway")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_up_passes_the_format_to_its_children(json_logs: None) -> None:
    from beluga_cli.up import beluga_command

    cmd = beluga_command()
    assert cmd[cmd.index("--log-format") + 1] == "json"
