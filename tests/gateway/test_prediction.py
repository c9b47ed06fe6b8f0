"""Routing's prediction of cached prompt tokens, checked against the worker's report."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.metrics import GatewayMetrics
from gateway.policies import RequestInfo


def value(m: GatewayMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def usage(prompt: int, cached: Any) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": cached}}


def test_held_tokens_are_what_policies_assume() -> None:
    info = RequestInfo("m", "chat", False, prompt_tokens=500, block_tokens=32,
                       keys=(b"k",) * 15, local_blocks={"a": 4, "b": 9}, pool_blocks=6)
    assert info.held_tokens("a") == 6 * 32  # the pool continues past a's own 4 blocks
    assert info.held_tokens("b") == 9 * 32
    assert info.held_tokens("c") == 6 * 32
    assert RequestInfo("m", "chat", False).held_tokens("a") is None  # unkeyed: no prediction


def test_a_right_prediction_counts_both_and_no_misprediction() -> None:
    m = GatewayMetrics("p")
    # 10 blocks held of a 320-token prompt: vLLM never reuses the block of the last token
    m.prediction(10 * 32, 32, usage(320, 9 * 32))
    assert value(m, "beluga_gateway_cached_tokens_total", kind="predicted") == 288
    assert value(m, "beluga_gateway_cached_tokens_total", kind="actual") == 288
    assert value(m, "beluga_gateway_cache_prediction_error_tokens_count") == 1
    assert value(m, "beluga_gateway_cache_prediction_error_tokens_bucket", le="0.0") == 1
    for d in ("over", "under"):
        assert value(m, "beluga_gateway_cache_mispredictions_total", direction=d) == 0


@pytest.mark.parametrize(("held", "cached", "direction"), [
    (256, 0, "over"), (256, 224, "over"), (0, 64, "under"), (64, 96, "under")])
def test_a_block_or_more_off_is_a_misprediction(held: int, cached: int, direction: str) -> None:
    m = GatewayMetrics("p")
    m.prediction(held, 32, usage(1000, cached))
    assert value(m, "beluga_gateway_cache_mispredictions_total", direction=direction) == 1
    assert value(m, "beluga_gateway_cache_prediction_error_tokens_sum") == abs(held - cached)


@pytest.mark.parametrize("report", [
    None, "x", [], {}, {"prompt_tokens": 100}, usage(100, None), usage(100, "7"),
    usage(100, -1), usage(100, 101), usage(0, 0), usage(-5, 0), usage(True, 0),
    {"prompt_tokens": 100, "prompt_tokens_details": None},
    {"prompt_tokens": 100, "prompt_tokens_details": [1]}])
def test_a_missing_or_hostile_report_is_not_counted(report: Any) -> None:
    m = GatewayMetrics("p")
    m.prediction(64, 32, report)
    m.prediction(None, 32, usage(100, 32))
    assert value(m, "beluga_gateway_cache_prediction_error_tokens_count") == 0
    assert value(m, "beluga_gateway_cached_tokens_total", kind="actual") == 0


def test_no_prediction_where_the_report_cannot_be_compared() -> None:
    from gateway.forward import predicted

    info = RequestInfo("m", "completions", False, prompt_tokens=100, block_tokens=32,
                       local_blocks={"a": 2})
    assert predicted(info, "a", {"prompt": "one prompt"}) == 64
    assert predicted(info, "a", {"prompt": [1, 2, 3]}) == 64  # token ids: one prompt
    assert predicted(info, "a", {"prompt": ["two", "prompts"]}) is None  # usage sums them
    assert predicted(info, "a", {"prompt": [[1, 2], [3]]}) is None
    assert predicted(info, "a", {"prompt": "p", "prompt_logprobs": 1}) is None


def test_absurd_counts_are_not_counted() -> None:
    m = GatewayMetrics("p")
    m.usage({"prompt_tokens": 10**400, "completion_tokens": 2**60})
    m.prediction(64, 32, usage(10**400, 5))
    assert value(m, "beluga_gateway_tokens_total", kind="prompt") == 0
    assert value(m, "beluga_gateway_cache_prediction_error_tokens_count") == 0
