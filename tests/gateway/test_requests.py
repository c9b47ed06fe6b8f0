from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import BadRequest
from gateway.requests import parse_request


def chat(**over: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(over)
    return json.dumps(body).encode()


def test_valid_chat_and_completion_pass_everything_through() -> None:
    req = parse_request(chat(stream=True, seed=3, logprobs=True, tools=[]), "chat")
    assert req.stream and req.model == "m" and req.payload["seed"] == 3
    req = parse_request(json.dumps({"model": "m", "prompt": [1, 2, 3]}).encode(), "completions")
    assert not req.stream


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b"\xff\xfe\x00", None),
        (b"[1,2]", None),
        (b"[" * 100000 + b"]" * 100000, None),
        (json.dumps({"messages": []}).encode(), "model"),
        (chat(model=5), "model"),
        (chat(model=""), "model"),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=["hi"]), "messages[0]"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(stream="yes"), "stream"),
        (chat(max_tokens="ten"), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_completion_tokens=-5), "max_completion_tokens"),
        (chat(n=1.5), "n"),
        (chat(temperature="hot"), "temperature"),
        (chat(logprobs="yes"), "logprobs"),
        (chat(top_logprobs=-1), "top_logprobs"),
    ],
)
def test_bad_chat_bodies_are_400_with_the_param(body: bytes, param: str | None) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_request(body, "chat")
    assert exc.value.param == param
    assert exc.value.response().status_code == 400


@pytest.mark.parametrize("prompt", [None, 5, [], [1, "a"], [[1], []], {"a": 1}, [True]])
def test_bad_prompts_are_rejected(prompt: Any) -> None:
    body = {"model": "m"} if prompt is None else {"model": "m", "prompt": prompt}
    with pytest.raises(BadRequest) as exc:
        parse_request(json.dumps(body).encode(), "completions")
    assert exc.value.param == "prompt"
