"""The gateway app on its own: Redis unreachable, no workers. Nothing may answer 5xx
except the documented 503, and every error is in the OpenAI shape."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from beluga.settings import Settings
from gateway.app import create_app


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0",
                        max_request_bytes=4096, registry_refresh_s=60)
    with TestClient(create_app(settings)) as c:
        yield c


def assert_openai_error(resp_json: dict[str, object]) -> dict[str, object]:
    err = resp_json["error"]
    assert isinstance(err, dict)
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_without_workers_a_valid_request_is_503(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 503
    assert assert_openai_error(resp.json())["code"] == "no_worker"


def test_bad_json_is_400_before_any_routing(client: TestClient) -> None:
    resp = client.post("/v1/completions", content=b"{oops",
                       headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert assert_openai_error(resp.json())["code"] == "invalid_json"


def test_oversized_body_is_413(client: TestClient) -> None:
    resp = client.post("/v1/completions", content=b"x" * 5000,
                       headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert_openai_error(resp.json())


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    resp = client.get("/v1/nothing")
    assert resp.status_code == 404
    assert assert_openai_error(resp.json())["type"] == "not_found_error"
    resp = client.get("/v1/chat/completions")
    assert resp.status_code == 405
    assert_openai_error(resp.json())


def test_health_and_models_report_the_empty_state(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health == {"status": "no_healthy_worker", "redis": False, "workers": []}
    assert client.get("/v1/models").json() == {"object": "list", "data": []}


def test_a_body_streamed_without_a_length_is_cut_at_the_limit(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    resp = client.post("/v1/chat/completions", content=chunks(),
                       headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert assert_openai_error(resp.json())["type"] == "invalid_request_error"


def test_an_unexpected_error_is_a_500_in_the_openai_shape(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app.gateway, "forward", broken)  # type: ignore[attr-defined]
    resp = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert resp.status_code == 500
    err = assert_openai_error(resp.json())
    assert err["type"] == "internal_error" and "a bug" not in str(err["message"])


def test_a_client_gone_before_its_body_arrived_gets_nothing_sent(client: TestClient) -> None:
    sent: list[dict[str, object]] = []
    messages = [{"type": "http.request", "body": b'{"model": "m"', "more_body": True},
                {"type": "http.disconnect"}]

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")]}
    asyncio.run(client.app(scope, receive, send))
    assert sent == [] and messages == []
