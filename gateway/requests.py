"""Parsing and validating client request bodies before they are proxied.

Only what the gateway itself needs is checked (the body is a JSON object, `model`, the
prompt or messages, `stream`, token limits); every other OpenAI parameter passes through
to the worker untouched, and the worker's own validation errors come back as 4xx.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import BadRequest

Endpoint = Literal["chat", "completions"]

MAX_DEPTH = 64          # JSON nesting a request may have (OpenAI's own bodies need < 10)
TOKEN_ID_LIMIT = 2**32  # token ids are u32 everywhere (vLLM, block keys)


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


def _token_ids(ids: list[Any], vocab: int | None) -> bool:
    """Whether `ids` are all token ids (ints, not bools); 400 for one out of range."""
    if not all(type(t) is int for t in ids):
        return False
    limit = vocab if vocab is not None else TOKEN_ID_LIMIT
    if ids and (min(ids) < 0 or max(ids) >= limit):
        bad = next(t for t in ids if t < 0 or t >= limit)
        raise BadRequest(f"token id {bad} is out of range: ids must be in [0, {limit})",
                         param="prompt", code="invalid_value")
    return True


def _check_prompt(prompt: Any, vocab: int | None) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if _token_ids(prompt, vocab):
            return
        if all(isinstance(p, list) and p and _token_ids(p, vocab) for p in prompt):
            return
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids",
                     param="prompt", code="invalid_type")


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether `value` nests containers at most `limit` deep (iterative: any depth)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if type(item) is dict:
            stack.extend((v, depth + 1) for v in item.values()
                         if type(v) is dict or type(v) is list)
        elif type(item) is list:
            stack.extend((v, depth + 1) for v in item if type(v) is dict or type(v) is list)
    return True


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


def parse_request(body: bytes, endpoint: Endpoint,
                  vocab_size: Callable[[str], int | None] | None = None) -> ParsedRequest:
    """Decode and check a chat or completions body; raises BadRequest with a clear message.
    `vocab_size(model)`: how many token ids the model has, when known (token-id prompts
    are checked against it; else against 2^32)."""
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # (not the decoder's message: it quotes the body, which may be huge)
        where = getattr(exc, "pos", None)
        at = f" at byte {where}" if isinstance(where, int) else ""
        raise BadRequest(f"request body is not valid JSON{at}: "
                         f"{getattr(exc, 'msg', 'too deeply nested')}",
                         code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    if not _depth_ok(payload, MAX_DEPTH):
        raise BadRequest(f"request body nests deeper than {MAX_DEPTH} levels",
                         code="invalid_json")
    model = payload.get("model")
    if model is None:
        raise BadRequest("missing required parameter 'model'", param="model",
                         code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model",
                         code="invalid_type")
    if len(model) > 256 or not model.isprintable():
        raise BadRequest("'model' must be at most 256 printable characters", param="model",
                         code="invalid_value")
    if endpoint == "chat":
        if "messages" not in payload:
            raise BadRequest("missing required parameter 'messages'", param="messages",
                             code="missing_required_parameter")
        _check_messages(payload["messages"])
    else:
        if "prompt" not in payload:
            raise BadRequest("missing required parameter 'prompt'", param="prompt",
                             code="missing_required_parameter")
        _check_prompt(payload["prompt"], vocab_size(model) if vocab_size else None)
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
