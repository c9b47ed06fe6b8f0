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


def completion(prompt: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt}).encode()


@pytest.mark.parametrize("prompt", [[-1], [2**32], [1, 2, 2**63], [[5], [-7]], [10**30]])
def test_token_ids_outside_u32_are_400(prompt: Any) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(completion(prompt), "completions")
    assert err.value.status_code == 400  # (param "prompt", or none past 64 bits)


def test_token_ids_are_checked_against_the_model_vocabulary_when_known() -> None:
    vocab = {"m": 1000}.get
    assert parse_request(completion([0, 999]), "completions", vocab).payload["prompt"]
    with pytest.raises(BadRequest, match=r"\[0, 1000\)"):
        parse_request(completion([0, 1000]), "completions", vocab)
    with pytest.raises(BadRequest):
        parse_request(completion([[1], [5000]]), "completions", vocab)
    # a model whose tokenizer is not loaded here: u32 bounds only
    assert parse_request(completion([5000]), "completions", {}.get)


def nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [65, 900, 990, 5000])
def test_nesting_past_the_limit_is_400_at_any_depth(depth: int) -> None:
    # (written out by hand: json.dumps itself cannot nest this deep)
    body = (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": '
            + b'[{"k": ' * (depth // 2) + b"1" + b"}]" * (depth // 2) + b"}")
    with pytest.raises(BadRequest) as err:
        parse_request(body, "chat")
    assert err.value.status_code == 400


def test_nesting_within_the_limit_passes() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "metadata": nested(60)}).encode()
    assert parse_request(body, "chat").model == "m"


@pytest.mark.parametrize("model", ["m\r\nX-Injected: 1", "m\x00", "x" * 257, "m\u2028"])
def test_model_names_that_cannot_be_a_header_or_a_label_are_400(model: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(chat(model=model), "chat")
    assert err.value.param == "model"


def test_an_invalid_json_message_does_not_quote_the_body() -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(b'{"model": "m", "prompt": "' + b"A" * 100_000 + b'", oops}',
                      "completions")
    assert len(err.value.message) < 200


@pytest.mark.parametrize("body", [
    b'{"model": "m", "prompt": "Hi", "stop": ["\\ud800"]}',             # lone, escaped
    b'{"model": "m", "prompt": "Hi \xed\xa0\x80"}',                      # lone, encoded
    b'{"model": "m", "prompt": "Hi", "user": {"\\udfff": 1}}',          # in a key
    b'{"model": "m", "prompt": "Hi", "top_k": 18446744073709551617}',
    b'{"model": "m", "prompt": "Hi", "seed": -9223372036854775809}',
    b'{"model": "m", "prompt": "Hi", "logit_bias": {"1": 1' + b"0" * 400 + b"}}",
])
def test_what_a_worker_cannot_take_is_400_here(body: bytes) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(body, "completions")
    assert err.value.status_code == 400


def test_valid_unicode_and_64_bit_numbers_pass() -> None:
    body = (b'{"model": "m", "prompt": "\\ud83d\\ude00 \xf0\x9f\x98\x80 1234567890123456789012",'
            b' "seed": 9223372036854775807}')
    assert parse_request(body, "completions").payload["seed"] == 2**63 - 1


@pytest.mark.parametrize("body", [
    b'{"model": "m", "prompt": [' + b",".join([b"[]"] * 300_000) + b"]}",
    b'{"model": "m", "prompt": [' + b",".join([b"1"] * 1_200_000) + b"]}",
    b"{" + b",".join(b'"k%d": 1' % i for i in range(150_000)) + b"}",
])
def test_bodies_that_would_build_millions_of_objects_are_400_before_parsing(
        body: bytes) -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(BadRequest, match="too many JSON values"):
        parse_request(body, "completions")
    assert time.perf_counter() - started < 0.05  # refused on the bytes, nothing parsed


def test_the_parse_work_bound_keeps_parsing_short_and_lets_real_requests_through() -> None:
    import time

    from gateway.requests import MAX_PARSE_WORK, parse_work

    chat10k = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "Hello, how are you? " * 20}] * 2_000}).encode()
    ids = json.dumps({"model": "m", "prompt": list(range(200_000))}).encode()
    for body in (chat10k, ids):
        assert parse_work(body) < MAX_PARSE_WORK
        parse_request(body, "chat" if b"messages" in body else "completions")
    # the worst shapes just under the bound parse in well under 100 ms
    keys = b"{" + b",".join(b'"k%d": 1' % i for i in range(MAX_PARSE_WORK // 12)) + b"}"
    assert parse_work(keys) <= MAX_PARSE_WORK
    started = time.perf_counter()
    json.loads(keys)
    assert time.perf_counter() - started < 0.5  # (~50 ms on this 2-core VM)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-16"])
def test_bodies_in_another_unicode_encoding_are_400(encoding: str) -> None:
    body = '{"model": "m", "prompt": "Hi", "top_k": 18446744073709551617}'.encode(encoding)
    with pytest.raises(BadRequest) as err:
        parse_request(body, "completions")
    assert err.value.status_code == 400 and err.value.code == "invalid_json"


def test_not_utf8_is_400_saying_so() -> None:
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_request(b'{"model": "m", "prompt": "\xff"}', "completions")


def test_usage_is_read_off_the_end_of_an_answer_without_parsing_it() -> None:
    from gateway.forward import usage_of

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    answer = {"id": "x", "choices": [{"text": '"usage": {"fake": 1}' * 1000}], "usage": usage}
    assert usage_of(json.dumps(answer).encode()) == usage
    assert usage_of(json.dumps({"usage": None}).encode()) is None
    assert usage_of(b'{"usage": {broken') is None
    assert usage_of(b"not json at all") is None
