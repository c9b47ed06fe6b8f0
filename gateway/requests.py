"""Parsing and validating client request bodies before they are proxied.

Only what the gateway itself needs is checked (the body is a JSON object, `model`, the
prompt or messages, `stream`, token limits); every other OpenAI parameter passes through
to the worker untouched, and the worker's own validation errors come back as 4xx.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import BadRequest

Endpoint = Literal["chat", "completions"]

MAX_DEPTH = 64          # JSON nesting a request may have (OpenAI's own bodies need < 10)
# Parsing happens on the event loop (json's C parser holds the GIL, so a thread would not
# help), and its cost depends on what the body makes it build, not on its size: a 7 MiB
# string parses in 3 ms, 600,000 distinct keys in 270 ms. Before parsing, the bytes give an
# upper bound of that work (brackets, colons and commas inside strings count too), weighted
# by what each costs (measured: ~60 ns an int, ~250 ns a float, ~440 ns a key, ~150 ns a
# container); past MAX_PARSE_WORK (~60 ms here) the body is refused. Real requests are far
# below it: a 10,000-message chat is ~270,000, a prompt of 200,000 token ids ~800,000.
MAX_PARSE_WORK = 1_000_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")  # (with the rest unchanged)
_LONG_RUN = b"0" * 19                                     # 19 digits: maybe past int64
# maybe a lone surrogate (an escape; an encoded one is not valid UTF-8, refused before)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_work(body: bytes) -> int:
    """An upper bound of what parsing `body` builds, in MAX_PARSE_WORK's units (~60 ns
    each): a value may be a float (~250 ns to parse), a key ~440 ns, a container ~150 ns."""
    return (4 * body.count(b",") + 8 * body.count(b":")
            + 3 * (body.count(b"{") + body.count(b"[")))


def _maybe_long_number(body: bytes) -> bool:
    """Whether `body` has a run of 19 digits (C-speed: ~3 ms for 7 MiB, a regex ~35 ms)."""
    return _LONG_RUN in body.translate(_DIGITS)


def _maybe_surrogate(body: bytes) -> bool:
    return b"\\u" in body and _SURROGATE.search(body) is not None
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


def _walk(payload: Any, ints: bool, texts: bool) -> str | None:
    """What is wrong with the parsed body's structure, if anything: nesting past MAX_DEPTH,
    (`ints`) an integer outside int64, (`texts`) a string with a lone surrogate (it has no
    UTF-8 encoding: the worker fails on it). Iterative: any depth."""
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"request body nests deeper than {MAX_DEPTH} levels"
        values: Any
        if type(item) is dict:
            if texts:
                for key in item:
                    if not _encodable(key):
                        return "a key in the request body is not valid Unicode"
            values = item.values()
        else:
            values = item
        for v in values:
            t = type(v)
            if t is dict or t is list:
                stack.append((v, depth + 1))
            elif t is int:
                if ints and not INT64_MIN <= v <= INT64_MAX:
                    return "a number in the request body is outside the 64-bit integer range"
            elif t is str and texts and not _encodable(v):
                return ("a string in the request body is not valid Unicode (a lone "
                        "surrogate escape such as \\ud800)")
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
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
    work = parse_work(body)
    if work > MAX_PARSE_WORK:
        raise BadRequest(f"request body has too many JSON values, keys, objects or arrays "
                         f"to parse (work {work} > {MAX_PARSE_WORK})", code="invalid_json")
    try:
        # UTF-8 only (json.loads would take UTF-16 and UTF-32 too, and encoded surrogates:
        # the checks below read the bytes as UTF-8)
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (at byte {exc.start})",
                         code="invalid_json") from None
    try:
        payload = json.loads(text)
    except RecursionError:
        raise BadRequest("request body nests too deeply", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        # (not the decoder's whole message: it may quote the body, which may be huge)
        raise BadRequest(f"request body is not valid JSON at byte {exc.pos}: {exc.msg}",
                         code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer of over 4,300 digits
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}",
                         code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    ints = _maybe_long_number(body)
    texts = _maybe_surrogate(body)
    containers = body.count(b"{") + body.count(b"[")
    if containers > MAX_DEPTH or ints or texts:  # (else nothing can be wrong: no walk)
        problem = _walk(payload, ints, texts)
        if problem is not None:
            raise BadRequest(problem, code="invalid_json")
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
