"""The request and error shapes of the gateway's OpenAPI document (/openapi.json).

The gateway validates only what it needs (gateway/requests.py) and passes every other
parameter through to vLLM, so these schemas describe the OpenAI parameters Beluga documents
and tests, and allow the rest (`additionalProperties`). Clients and schemathesis read them.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "integer", "null"]},
        },
    }},
}

_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                         "maxItems": 4}, {"type": "null"}]}

_COMMON: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1,
              "description": "A model name from GET /v1/models."},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"],
                       "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "seed": {"type": ["integer", "null"]},
    "stop": _STOP,
    "user": {"type": "string"},
}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        **_COMMON,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant"]},
                "content": {"anyOf": [{"type": "string"},
                                      {"type": "array", "items": _TEXT_PART, "minItems": 1}]},
                "name": {"type": "string"},
            },
        }},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object"},
        }},
        "tools": {"type": "array", "items": {
            "type": "object", "required": ["type", "function"],
            "properties": {"type": {"const": "function"}, "function": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                               "parameters": {"type": "object"}},
            }},
        }},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]},
                                  {"type": "object"}]},
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": True,
    "properties": {
        **_COMMON,
        "prompt": {"anyOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "items": {"type": "string"}},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "minItems": 1, "items": {
                "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}},
        ]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 5},
        "echo": {"type": ["boolean", "null"]},
    },
}

_ERRORS = {
    "400": "The request is malformed or a parameter is invalid.",
    "401": "An API key is required and was missing or wrong.",
    "404": "No worker serves that model.",
    "413": "The request body is larger than the gateway accepts.",
    "502": "The worker failed.",
    "503": "No healthy worker can serve the request now.",
    "504": "The worker did not answer in time.",
}


def operation(request_schema: dict[str, Any], answer: str) -> dict[str, Any]:
    """`openapi_extra` of a POST endpoint that reads its body itself."""
    return {
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": request_schema}}},
        "responses": {
            "200": {"description": answer, "content": {
                "application/json": {"schema": {"type": "object"}},
                # one schema per event: `data` is a JSON chunk, an error object or [DONE]
                "text/event-stream": {"schema": {
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }},
            }},
            **{code: {"description": text,
                      "content": {"application/json": {"schema": _ERROR}}}
               for code, text in _ERRORS.items()},
        },
    }
