"""Parsing and validating client request bodies before they are proxied.

Only what the gateway itself needs is checked (the body is a JSON object, `model`, the
prompt or messages, `stream`, token limits); every other OpenAI parameter passes through
to the worker untouched, and the worker's own validation errors come back as 4xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import BadRequest

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True)
class ParsedRequest:
    endpoint: Endpoint
    model: str
    stream: bool
    payload: dict[str, Any]


def _int_field(payload: dict[str, Any], name: str, minimum: int) -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer", param=name, code="invalid_type")
    if value < minimum:
        raise BadRequest(f"'{name}' must be at least {minimum}", param=name,
                         code="invalid_value")


def _bool_field(payload: dict[str, Any], name: str) -> None:
    value = payload.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean", param=name, code="invalid_type")


def _number_field(payload: dict[str, Any], name: str) -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number", param=name, code="invalid_type")


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in p) for p in prompt):
            return
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids",
                     param="prompt", code="invalid_type")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages",
                         code="invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]",
                             code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"'messages[{i}].role' must be a non-empty string",
                             param=f"messages[{i}].role", code="invalid_type")


def parse_request(body: bytes, endpoint: Endpoint) -> ParsedRequest:
    """Decode and check a chat or completions body; raises BadRequest with a clear message."""
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is None:
        raise BadRequest("missing required parameter 'model'", param="model",
                         code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model",
                         code="invalid_type")
    if endpoint == "chat":
        if "messages" not in payload:
            raise BadRequest("missing required parameter 'messages'", param="messages",
                             code="missing_required_parameter")
        _check_messages(payload["messages"])
    else:
        if "prompt" not in payload:
            raise BadRequest("missing required parameter 'prompt'", param="prompt",
                             code="missing_required_parameter")
        _check_prompt(payload["prompt"])
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        _int_field(payload, name, 1)
    if endpoint == "chat":
        _bool_field(payload, "logprobs")
        _int_field(payload, "top_logprobs", 0)
    else:
        _int_field(payload, "logprobs", 0)
        _bool_field(payload, "echo")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _number_field(payload, name)
    return ParsedRequest(endpoint=endpoint, model=model, stream=stream, payload=payload)
