"""Helpers of the pool e2e tests: exact token-id prompts, completions, worker counters."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import cache

import httpx
from transformers import AutoTokenizer

from kvpool import KVPool
from tests.e2e.conftest import BLOCK, MODEL, MODEL_NAME, WORKER_HEADERS, Stack

__all__ = ["BLOCK", "complete", "corpus", "delta", "metrics", "pool_of", "prompt"]
WORDS = ("river mountain quiet engine silver market garden letter winter doctor window "
         "signal harbor orange paper castle forest bridge camera pocket rabbit thunder "
         "violin ladder marble planet candle desert island jacket lemon mirror needle "
         "ocean pepper rocket saddle tunnel velvet wagon yellow zebra anchor basket")


@cache
def corpus() -> list[int]:
    """~6,000 tokens of seeded pseudo-text."""
    rng = random.Random(1234)
    sentences = []
    for _ in range(700):
        words = rng.sample(WORDS.split(), rng.randint(5, 11))
        sentences.append(" ".join(words).capitalize() + ".")
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids: list[int] = tok(" ".join(sentences), add_special_tokens=False)["input_ids"]
    return ids


def prompt(offset: int, length: int) -> list[int]:
    ids = corpus()
    assert offset + length <= len(ids)
    return ids[offset:offset + length]


def complete(url: str, ids: list[int], max_tokens: int = 12,
             model: str = MODEL_NAME) -> list[int]:
    r = httpx.post(f"{url}/v1/completions", timeout=300, headers=WORKER_HEADERS, json={
        "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    out: list[int] = r.json()["choices"][0]["token_ids"]
    return out


def metrics(url: str) -> dict[str, float]:
    """beluga_worker_* values of one worker, summed over labels (prompt tokens by source)."""
    out: dict[str, float] = defaultdict(float)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if not line.startswith("beluga_worker_") or "_created" in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if 'source="' in name_labels:
            name += ":" + name_labels.split('source="', 1)[1].split('"', 1)[0]
        out[name] += float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def pool_of(stack: Stack) -> KVPool:
    return KVPool.attach(stack.pool_path)
