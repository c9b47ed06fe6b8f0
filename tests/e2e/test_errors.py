"""Malformed and hostile requests get OpenAI errors with the right status, never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_NAME, Stack

MSG = [{"role": "user", "content": "hi"}]


def post(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json"})


def error_of(resp: httpx.Response) -> dict[str, Any]:
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    return dict(err)


@pytest.mark.parametrize(
    "body",
    [b"{bad json", b"", b"null", b"[]", b"\xff\xfe", b"[" * 50000,
     json.dumps({"messages": MSG}).encode(),
     json.dumps({"model": MODEL_NAME, "messages": "hi"}).encode(),
     json.dumps({"model": MODEL_NAME, "messages": MSG, "max_tokens": "10"}).encode(),
     json.dumps({"model": MODEL_NAME, "messages": MSG, "stream": "true"}).encode(),
     json.dumps({"model": MODEL_NAME, "messages": MSG, "logprobs": "yes"}).encode(),
     json.dumps({"model": [MODEL_NAME], "messages": MSG}).encode()],
)
def test_malformed_chat_bodies_are_400(http: httpx.Client, body: bytes) -> None:
    resp = post(http, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "extra",
    [{"max_tokens": 10**9}, {"temperature": -3}, {"n": 10**6},
     {"top_logprobs": 10**4, "logprobs": True},
     {"messages": [{"role": "user", "content": {"nested": True}}]}, {"top_p": 7}],
)
def test_values_only_the_engine_can_judge_come_back_as_4xx(
        http: httpx.Client, extra: dict[str, Any]) -> None:
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 4, **extra}
    resp = post(http, "/v1/chat/completions", json.dumps(body).encode())
    assert 400 <= resp.status_code < 500, resp.text
    error_of(resp)


def test_huge_prompt_is_a_clear_400(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "hello " * 5000, "max_tokens": 4}
    resp = post(http, "/v1/completions", json.dumps(body).encode())
    assert resp.status_code == 400, resp.text
    error_of(resp)


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    resp = post(http, "/v1/completions", b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}')
    assert resp.status_code == 413
    error_of(resp)


def test_unknown_model_is_404_through_the_sdk(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-9", messages=MSG)
    assert exc.value.status_code == 404
    assert "gpt-9" in str(exc.value)
