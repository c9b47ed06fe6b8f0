"""schemathesis against the gateway's own OpenAPI document, over real HTTP.

The gateway runs under uvicorn with a real Redis registry and a stand-in worker that answers
like vLLM (JSON or server-sent events). Every operation in /openapi.json gets generated
requests, schema-valid ones and, for the POST bodies, deliberately broken ones: no 5xx, every
status and body as documented, an answer within the timeout (no hang). The same run against
real vLLM workers is tests/e2e/test_openapi_fuzz.py. The requests are drawn from a fixed
seed (tests/fuzz.py), the same every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.fuzz import SEED, aim_at, fuzz
from tests.support import gateway_in_front_of

PREFIX = "beluga:fuzz"
MODEL = "fuzz-model"


def worker_stand_in() -> FastAPI:
    """Answers any body like vLLM would for a valid one."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    async def answer(request: Request, obj: str) -> Response:
        body = await request.json()
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                yield f'data: {{"object": "{obj}.chunk", "choices": []}}\n\n'.encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"object": obj, "model": body.get("model"), "choices": [],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, "text_completion")

    return app


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    yield from gateway_in_front_of(worker_stand_in(), "w-fuzz", MODEL, PREFIX,
                                   max_request_bytes=64 * 1024)


def test_no_5xx_no_hang_and_answers_as_documented(gateway_url: str) -> None:
    labels = fuzz(gateway_url, aim_at(MODEL), examples=60, timeout_s=10, seed=SEED)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
            "GET /health", "GET /metrics"} <= set(labels)


DRAW = """
import json, sys
from tests.fuzz import SEED, drive, hash_of, operations
seen = []
for op, mode in operations(sys.argv[1]):
    drive(op, mode, 15, SEED, lambda case: seen.append(
        [op.label, mode.value, hash_of({"body": case.body, "query": case.query})]))
print(json.dumps(seen))
"""


def test_the_draw_is_the_same_in_every_process(gateway_url: str) -> None:
    """CI cannot be red or green by luck: two processes with different hash seeds (as two
    CI runs have) draw exactly the same requests from SEED."""
    root = Path(__file__).resolve().parents[2]
    draws = []
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", DRAW, gateway_url], cwd=root,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed},
                             capture_output=True, text=True, timeout=300, check=True)
        draws.append(out.stdout)
    drawn = json.loads(draws[0])
    assert draws[0] == draws[1] and len(drawn) > 20
    assert len({tuple(x) for x in drawn}) > 10  # (not one request drawn over and over)
