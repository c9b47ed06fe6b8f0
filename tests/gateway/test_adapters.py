"""LoRA adapters in the registry: a name means one model, never two."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from beluga.registry import WorkerRecord
from beluga.settings import Settings
from gateway.policies import RequestInfo
from gateway.workers import WorkerRegistry, WorkerState


def state(wid: str, model: str, adapters: list[str]) -> WorkerState:
    now = time.time()
    return WorkerState(WorkerRecord.model_validate({
        "schema": 1, "id": wid, "url": f"http://{wid}", "model": model, "capacity": 4,
        "pid": 1, "started_at": now, "heartbeat_at": now, "adapters": adapters}))


def registry(*workers: WorkerState) -> WorkerRegistry:
    reg = WorkerRegistry(Settings(), aioredis.Redis.from_url("redis://127.0.0.1:1/0"))
    reg._snapshot = workers
    return reg


def test_an_adapter_is_served_by_the_workers_that_list_it() -> None:
    a, b, c = state("a", "llama", ["sql"]), state("b", "llama", []), state("c", "qwen", [])
    reg = registry(a, b, c)
    assert reg.for_model("sql") == [a] and reg.for_model("llama") == [a, b]
    assert reg.models() == ["llama", "qwen", "sql"] and reg.ambiguous("sql") == []


def test_a_model_name_is_never_taken_as_an_adapter() -> None:
    a, b = state("a", "llama", ["tuned"]), state("b", "tuned", [])
    reg = registry(a, b)
    assert reg.for_model("tuned") == [b]
    assert reg.models() == ["llama", "tuned"]


def test_one_adapter_name_on_two_base_models_serves_nobody() -> None:
    a, b = state("a", "llama", ["sql"]), state("b", "qwen", ["sql"])
    reg = registry(a, b)
    assert reg.for_model("sql") == [] and reg.ambiguous("sql") == ["llama", "qwen"]
    assert reg.models() == ["llama", "qwen"]


def test_pool_blocks_count_only_for_workers_sharing_the_pool() -> None:
    info = RequestInfo("m", "chat", False, prompt_tokens=640, block_tokens=32,
                       local_blocks={"a": 2}, pool_blocks=10, pool_workers=frozenset({"b"}))
    assert info.held_tokens("a") == 2 * 32 and info.held_tokens("b") == 10 * 32
    assert info.pool_blocks_for("a") == 0
    everyone = RequestInfo("m", "chat", False, block_tokens=32, pool_blocks=10)
    assert everyone.held_tokens("a") == 10 * 32


def test_the_request_that_stops_a_cpu_lora_engine_is_recognised_and_nothing_else() -> None:
    from gateway.forward import lora_crash

    assert lora_crash("completions", {"n": 2, "echo": True, "logprobs": 2})
    assert lora_crash("completions", {"n": 3, "prompt_logprobs": 0})
    assert lora_crash("chat", {"best_of": 2, "prompt_logprobs": 1})
    # what vLLM's models coerce to a count (n itself must be an int: gateway/requests.py)
    for best_of in ("2", " 3 ", 2.0, 1e300, "1e3"):
        assert lora_crash("completions", {"best_of": best_of, "prompt_logprobs": 1}), best_of
    for payload in ({"n": 2, "logprobs": 2}, {"n": 1, "echo": True, "logprobs": 2},
                    {"echo": True, "logprobs": 2}, {"n": 2, "echo": True},
                    {"n": True, "prompt_logprobs": 1}, {"n": 1.0, "prompt_logprobs": 1},
                    {"best_of": "x", "prompt_logprobs": 1},
                    {"best_of": "nan", "prompt_logprobs": 1},
                    {"n": [2], "prompt_logprobs": 1}, {"n": 2, "prompt_logprobs": None}):
        assert not lora_crash("completions", payload), payload
    assert not lora_crash("chat", {"n": 2, "echo": True, "logprobs": True})  # chat's echo
