"""The gateway app on its own: Redis unreachable, no workers. Nothing may answer 5xx
except the documented 503, and every error is in the OpenAI shape."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from beluga.settings import Settings
from gateway.app import create_app
from gateway.front import Relay


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
    assert health == {"status": "no_healthy_worker", "redis": False, "tokenizers": {},
                      "workers": []}
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


SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


def test_a_relay_ends_at_once_when_its_client_leaves_and_closes_the_stream() -> None:
    """The client goes away while the worker has not sent its next event: the relay stops
    then, not when the worker speaks again, and the stream (the worker's connection) is
    closed."""
    async def scenario() -> tuple[list[dict[str, Any]], bool]:
        closed = asyncio.Event()
        left = asyncio.Event()

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"data: 1\n\n"
                await asyncio.Event().wait()  # the worker's next event never comes
                yield b"data: 2\n\n"
            finally:
                closed.set()

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) == 2:
                asyncio.get_running_loop().call_later(0.05, left.set)

        await asyncio.wait_for(Relay(stream(), {"x-beluga-worker": "w"})(SCOPE, receive, send),
                               5)
        await asyncio.sleep(0.01)  # this task was not left cancelled
        return sent, closed.is_set()

    sent, closed = asyncio.run(scenario())
    assert closed
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (b"x-beluga-worker", b"w") in sent[0]["headers"] and sent[1]["body"] == b"data: 1\n\n"


def test_a_relay_that_finishes_is_not_cancelled_by_the_disconnect_that_follows() -> None:
    """uvicorn's `receive` reports a disconnect as soon as the response is complete: the
    relay's watcher must not act on it."""
    async def scenario() -> list[dict[str, Any]]:
        complete = asyncio.Event()

        async def stream() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0)
                yield b"data: %d\n\n" % i

        async def receive() -> dict[str, Any]:
            await complete.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message["more_body"]:
                complete.set()

        await Relay(stream(), {})(SCOPE, receive, send)
        for _ in range(3):
            await asyncio.sleep(0.01)  # a cancellation left behind would land here
        return sent

    sent = asyncio.run(scenario())
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n",
                                                 b""]
    assert sent[0]["headers"][0] == (b"content-type", b"text/event-stream; charset=utf-8")
