"""The gateway's own behaviours seen through the official `openai` SDK over real HTTP: API
keys (401), per-tenant cache salts, unknown models (404), bodies over the limit (413), a
dead worker's error event in a stream, parameters passed through untouched. The stand-in
worker echoes what it received; the same SDK against real vLLM is tests/e2e/test_api.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.support import gateway_in_front_of

PREFIX = "beluga:sdk"
MODEL = "sdk-model"


def echo_worker() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        if body.get("user") == "slow":
            await asyncio.sleep(1.5)
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0,
                         "model": MODEL, "choices": [{"index": 0, "delta": {"content": "hi"},
                                                      "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if body.get("user") == "die":
                    raise RuntimeError("the worker died")
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        # The request as the worker got it, in the answer's content.
        return JSONResponse({
            "id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps(body)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    return app


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    for url in gateway_in_front_of(echo_worker(), "w-echo", MODEL, PREFIX,
                                   max_request_bytes=4096,
                                   api_keys="key-a:alice,key-b:bob"):
        yield url + "/v1"


def sdk(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)


def sent(resp: Any) -> dict[str, Any]:
    """What the worker received, from the echo."""
    return dict(json.loads(resp.choices[0].message.content))


HI = [{"role": "user", "content": "hi"}]


def test_a_missing_or_wrong_key_is_401(base_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(base_url, "wrong").chat.completions.create(model=MODEL, messages=HI)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(base_url, "wrong").models.list()
    assert [m.id for m in sdk(base_url, "key-a").models.list()] == [MODEL]


def test_parameters_pass_through_and_tenants_get_their_own_salt(base_url: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    extra = dict(n=2, stop=["\n"], seed=5, logprobs=True, top_logprobs=3,
                 max_completion_tokens=7, tools=tools, tool_choice="auto",
                 response_format={"type": "json_object"})
    a = sent(sdk(base_url, "key-a").chat.completions.create(model=MODEL, messages=HI,
                                                             **extra))
    for name, value in extra.items():
        assert a[name] == value, name
    b = sent(sdk(base_url, "key-b").chat.completions.create(model=MODEL, messages=HI))
    again = sent(sdk(base_url, "key-a").chat.completions.create(model=MODEL, messages=HI))
    assert a["cache_salt"] == again["cache_salt"] != b["cache_salt"]


def test_unknown_model_is_404_and_a_huge_body_413(base_url: str) -> None:
    client = sdk(base_url, "key-a")
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=HI)
    assert nf.value.code == "model_not_found" and MODEL in nf.value.message
    with pytest.raises(openai.APIStatusError) as big:
        client.chat.completions.create(model=MODEL,
                                       messages=[{"role": "user", "content": "x" * 8000}])
    assert big.value.status_code == 413


def test_a_stream_cut_by_the_worker_raises_in_the_sdk(base_url: str) -> None:
    client = sdk(base_url, "key-a")
    ok = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in ok) == "hi"
    cut = client.chat.completions.create(model=MODEL, messages=HI, stream=True, user="die")
    got = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for chunk in cut:
            got.append(chunk.choices[0].delta.content)
    assert got == ["hi"]


def test_clients_that_leave_early_leave_no_request_counted_open(base_url: str) -> None:
    """A client gone before the worker answered (streaming or not): the gateway's count of
    open requests on the worker (its load) returns to zero."""
    import httpx
    health = base_url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + 10
    while not httpx.get(health).json()["workers"][0]["healthy"]:  # back after the test above
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client = openai.OpenAI(base_url=base_url, api_key="key-a", max_retries=0, timeout=0.3)
    for stream in (False, True):
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model=MODEL, messages=HI, stream=stream,
                                           user="slow")
    deadline = time.monotonic() + 10
    while httpx.get(health).json()["workers"][0]["in_flight"] != 0:
        assert time.monotonic() < deadline, httpx.get(health).json()
        time.sleep(0.1)
