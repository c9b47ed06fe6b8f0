"""The OpenAI surface through the gateway, with the official SDK as the client."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.tokenize import PromptTokenizer
from tests.e2e.conftest import BLOCK, LORA_NAME, MODEL, MODEL_NAME, Stack

TOKENIZER = PromptTokenizer({MODEL_NAME: MODEL})

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_what_the_workers_serve(client: openai.OpenAI) -> None:
    # the model and the LoRA adapter every worker of the session serves beside it
    assert [m.id for m in client.models.list()] == sorted([MODEL_NAME, LORA_NAME])


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION,
                                          temperature=0, max_tokens=20)
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.usage is not None and resp.usage.prompt_tokens > 0


def test_chat_streams_paris(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION,
                                            temperature=0, max_tokens=20, stream=True)
    chunks = [c for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert "Paris" in text


def test_completions_answer_paris_streaming_and_not(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL_NAME, prompt="The capital of France is",
                                     temperature=0, max_tokens=8)
    assert "Paris" in resp.choices[0].text
    stream = client.completions.create(model=MODEL_NAME, prompt="The capital of France is",
                                       temperature=0, max_tokens=8, stream=True)
    assert "Paris" in "".join(c.choices[0].text for c in stream)


def test_openai_parameters_pass_through(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, n=2, seed=7, temperature=0.8,
        max_tokens=5, logprobs=True, top_logprobs=2, stop=["\n"])
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert len(choice.logprobs.content[0].top_logprobs) == 2
    usage_stream = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=3, stream=True,
        stream_options={"include_usage": True})
    usages = [c.usage for c in usage_stream if c.usage is not None]
    assert usages and usages[-1].completion_tokens == 3


def test_max_completion_tokens_and_completions_parameters(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_completion_tokens=3, temperature=0,
        extra_body={"ignore_eos": True})
    assert chat.usage is not None and chat.usage.completion_tokens == 3
    assert chat.choices[0].finish_reason == "length"
    text = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=2, n=2, seed=3,
        temperature=0.9, logprobs=2)
    assert len(text.choices) == 2
    for choice in text.choices:
        assert choice.logprobs is not None and choice.logprobs.top_logprobs
    # The same seed gives the same sample.
    again = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=2, n=2, seed=3,
        temperature=0.9, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in text.choices]
    echoed = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=2, logprobs=2,
        echo=True)
    assert echoed.choices[0].text.startswith("The capital of France is")
    assert echoed.choices[0].logprobs is not None
    # Several sequences with prompt logprobs stop a LoRA-enabled vLLM 0.32 CPU engine (the
    # session's workers serve an adapter): refused at the gateway, the workers unharmed.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL_NAME, prompt="The capital of France is", max_tokens=2, n=2,
            temperature=0.9, logprobs=2, echo=True)
    assert info.value.code == "unsupported_with_lora"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False},
    },
}


def test_tools_reach_the_model_and_calls_come_back(client: openai.OpenAI) -> None:
    """A named tool choice (the workers run with --tool-call-parser hermes): the call comes
    back through the gateway in the OpenAI shape. (How well a 135M model fills the arguments
    is not the gateway's business: only that they are JSON.)"""
    resp = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=100, temperature=0,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = resp.choices[0].message.tool_calls
    assert calls and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)
    assert resp.choices[0].finish_reason in ("stop", "tool_calls")


def test_response_format_json_schema_is_honoured(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["capital", "country"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=100, temperature=0, messages=QUESTION,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema}})
    answer = json.loads(resp.choices[0].message.content or "")
    assert set(answer) == {"capital", "country"}
    assert all(isinstance(v, str) for v in answer.values())
    streamed = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=100, temperature=0, messages=QUESTION, stream=True,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert set(json.loads(text)) == {"capital", "country"}


def test_requests_spread_over_both_workers(client: openai.OpenAI, stack: Stack) -> None:
    """Short prompts (no full KV block: nothing to stick to) rotate over the workers. With a
    system message of its own the prompt is 21 tokens, under the stack's 32-token block (the
    model's default system prompt would make it 34: one full block, placed by its hash, and
    four such prompts all land on one worker one session in eight)."""
    seen = set()
    for i in range(4):
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Say {i}."}]
        assert len(TOKENIZER.tokens(MODEL_NAME, "chat", {"messages": messages}) or []) < BLOCK
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=messages, max_tokens=2)  # type: ignore[arg-type]
        assert raw.headers["x-beluga-route"] in {"cold", "local", "pool"}
        seen.add(raw.headers["x-beluga-worker"])
    assert seen == {w.id for w in stack.workers()}
    assert len(seen) == 2


def test_a_long_prompt_sticks_to_the_worker_that_has_it(client: openai.OpenAI) -> None:
    """pool_aware: the second time, the worker holding the prompt in its own cache wins."""
    long_text = " ".join(f"Fact {i}: the code word number {i} is {i * 37 % 1000}."
                         for i in range(60))  # ~1,000 tokens: several full blocks
    messages = [{"role": "user", "content": long_text + " What is code word 7?"}]
    first = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    routes = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=messages, max_tokens=2)  # type: ignore[arg-type]
        routes.append((raw.headers["x-beluga-worker"], raw.headers["x-beluga-route"]))
    assert routes == [(first.headers["x-beluga-worker"], "local")] * 3


def test_streams_get_usage_only_when_asked_and_the_gateway_counts_it(stack: Stack) -> None:
    import httpx
    body = {"model": MODEL_NAME, "stream": True, "max_tokens": 4, "min_tokens": 4,
            "messages": [{"role": "user", "content": "Count to three."}]}
    before = httpx.get(f"{stack.base_url}/metrics").text
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                      timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("usage" not in c and c["choices"] for c in chunks)
    after = httpx.get(f"{stack.base_url}/metrics").text

    def completion_tokens(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('beluga_gateway_tokens_total{kind="completion",'
                               f'model="{MODEL_NAME}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    assert completion_tokens(after) - completion_tokens(before) == 4


def test_a_request_id_reaches_vllm_and_comes_back(client: openai.OpenAI) -> None:
    # vLLM names the completion after the X-Request-Id it is sent (its `id` field), so
    # this proves the gateway forwarded the client's id to the real worker.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=4,
        extra_headers={"X-Request-Id": "e2e-request-42"})
    assert raw.headers["x-request-id"] == "e2e-request-42"
    assert raw.parse().id == "chatcmpl-e2e-request-42"
    made = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=4)
    rid = made.headers["x-request-id"]
    assert len(rid) == 32 and made.parse().id == f"chatcmpl-{rid}"
