"""Reuse correctness, prompt by prompt: worker B loads a prompt's full blocks from the pool
(A computed them) and answers exactly as a plain vLLM worker (the session's reference: no
connector) does from its own prefix cache holding the same prefix, token for token.

26 varied prompts (chats of several turns, code, four non-Latin scripts, numbers and
tables, long documents, lengths from one block to ~3,000 tokens around block boundaries),
each checked on its own:

* A (with the connector, computing cold) equals the reference's cold answer;
* B's report for that request (usage.prompt_tokens_details.cached_tokens, and B's own
  pool-token counter across it) is exactly the prompt's full blocks short of the block of
  its last token: everything came from the pool, nothing from elsewhere;
* B equals the reference's answer from its prefix cache (the same KV at the same block
  boundaries), and also its cold answer wherever the reference's cold and cached answers
  agree. Where those two differ (bf16 arithmetic of a split prefill; vLLM's prefix caching
  with or without Beluga) the test says which prompts, and still requires B == cached.

Two of them share their start with an earlier prompt B served: B finds those blocks in its
own cache and exactly the rest in the pool.

Every prompt starts with its own tag, so no worker holds any of it before this test."""

from __future__ import annotations

import warnings
from typing import Any

import httpx

from tests.e2e.conftest import MODEL_NAME, WORKER_HEADERS, Stack
from tests.e2e.pool_helpers import BLOCK, corpus, delta, metrics

RIVERS = ("Nile", "Amazon", "Yangtze", "Mississippi", "Danube", "Volga", "Mekong", "Niger")

CHINESE = ("长江是中国最长的河流，全长约六千三百公里，流经十一个省级行政区。沿岸城市众多，"
           "包括重庆、武汉和上海。三峡工程位于长江上游，是世界上最大的水电站之一。")
RUSSIAN = ("Волга — крупнейшая река Европы. Она берёт начало на Валдайской возвышенности и "
           "впадает в Каспийское море. На её берегах стоят Тверь, Ярославль, Нижний "
           "Новгород, Казань, Самара и Волгоград.")
ARABIC = ("نهر النيل هو أطول نهر في أفريقيا، ويمر عبر إحدى عشرة دولة. يتكون من رافدين "
          "رئيسيين هما النيل الأبيض والنيل الأزرق، ويلتقيان في الخرطوم.")
JAPANESE = ("信濃川は日本で最も長い川で、長野県と新潟県を流れています。上流では千曲川と"
            "呼ばれ、日本海に注ぎます。流域には多くの田んぼが広がっています。")

PYTHON = '''def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals; the result is sorted."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.items = capacity, {}

    def get(self, key):
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value
        return value
'''
C_CODE = '''#include <stdint.h>
#include <string.h>

/* FNV-1a over a buffer: 64-bit offset basis and prime. */
static uint64_t fnv1a(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

int copy_checked(char *dst, size_t cap, const char *src) {
    size_t len = strlen(src);
    if (len + 1 > cap) return -1;
    memcpy(dst, src, len + 1);
    return (int)len;
}
'''
JSON_DOC = ('{"service": "beluga-gateway", "replicas": 3, "routing": {"policy": "pool_aware", '
            '"timeout_s": 0.25, "max_chars": 200000}, "workers": [' + ", ".join(
                f'{{"id": "worker-{i}", "port": {8100 + i}, "capacity": {16 + 4 * i}, '
                f'"labels": ["cpu", "zone-{i % 3}"]}}' for i in range(12)) + "]}")


def table(rows: int) -> str:
    head = "| city | population | area km2 | founded |\n|---|---|---|---|\n"
    return head + "".join(f"| City{i} | {100_000 + 7_919 * i} | {(i * 37) % 900 + 50} | "
                          f"{1100 + (i * 53) % 900} |\n" for i in range(rows))


def csv(rows: int) -> str:
    return "t,x,y,z\n" + "".join(f"{i},{(i * 31) % 97 / 7:.3f},{(i * i) % 1009},"
                                 f"{-(i * 13) % 211}\n" for i in range(rows))


def document(words_from: int, tokens: int) -> list[int]:
    """`tokens` ids of the session's seeded text (tests/e2e/pool_helpers.corpus)."""
    ids = corpus()
    return ids[words_from:words_from + tokens]


def chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


# (name, how to make it): a string prompt, chat messages, or token ids (exact lengths).
PROMPTS: list[tuple[str, Any]] = [
    ("chat, one question", chat("Which river is the longest on each continent? Give one "
                                "line per continent and say how sure you are.")),
    ("chat, four turns", chat("Name three rivers in Europe.", "The Danube, the Rhine and "
                              "the Volga.", "Which is longest?", "The Volga, at 3,530 km.",
                              "And which countries does the Danube cross?",
                              system="You are a terse geography tutor.")),
    ("chat, eight turns", chat(*[f"Tell me about the {r} in one sentence." if i % 2 == 0
                                 else f"The {r} is a major river, {(i * 577) % 6000} km "
                                 "long, important for trade and farming."
                                 for i, r in enumerate(RIVERS * 2)])),
    ("chat with a pasted report", chat("Summarize this report in three bullet points:\n\n"
                                       + " ".join(f"In quarter {q}, revenue grew by "
                                                  f"{(q * 7) % 13 + 1}% while costs changed by "
                                                  f"{(q * 11) % 9 - 4}%." for q in range(60)))),
    ("python code", "Review this code and point out bugs:\n\n" + PYTHON),
    ("C code", "Explain what this C file does, function by function:\n\n" + C_CODE),
    ("JSON config", "Validate this configuration and list problems:\n\n" + JSON_DOC),
    ("SQL", "Rewrite for speed:\nSELECT c.name, SUM(o.total) FROM customers c JOIN orders o "
            "ON o.customer_id = c.id WHERE o.created_at > NOW() - INTERVAL '30 days' GROUP "
            "BY c.name HAVING SUM(o.total) > 1000 ORDER BY 2 DESC LIMIT 50;"),
    ("Chinese", "请总结以下内容：" + CHINESE * 4),
    ("Russian", "Кратко перескажи текст: " + RUSSIAN * 4),
    ("Arabic", "لخص النص التالي: " + ARABIC * 4),
    ("Japanese", "次の文章を要約してください：" + JAPANESE * 4),
    ("symbols and emoji", "Translate the mood: " + " ".join(
        f"{c}×{i} → ✓ ∑{i}² ≈ {i * i}" for i, c in enumerate("☀☁☂☃★☆♠♣♥♦", 1))),
    ("markdown table", "Which city is oldest?\n\n" + table(24)),
    ("numbers, CSV", "Find the maximum of y:\n" + csv(80)),
    ("arithmetic", "Check each line: " + "; ".join(f"{i} * {i + 7} = {i * (i + 7)}"
                                                   for i in range(1, 60))),
    ("document, ~1,000 tokens", document(130, 1000)),
    ("document, ~2,000 tokens", document(1490, 2000)),
    ("document, ~3,000 tokens", document(2810, 3000)),
    ("one block + 1 token", document(4001, BLOCK + 1)),
    ("two blocks", document(4101, 2 * BLOCK)),
    ("two blocks + 1 token", document(4203, 2 * BLOCK + 1)),
    ("three blocks - 1 token", document(4307, 3 * BLOCK - 1)),
    ("a sentence repeated", "Repeat after me. " + "The quick brown fox jumps over the lazy "
                            "dog. " * 40),
]


# Prompts that share a prefix with an earlier one (B served that one: its own cache holds
# the shared blocks, the pool the rest): (name, index of the earlier prompt, its leading
# tokens kept, a new tail of the corpus).
EXTENDED: list[tuple[str, int, int, tuple[int, int]]] = [
    ("a document's first 1,000 tokens, then new text", 17, 1000, (5700, 300)),
    ("a chat's opening, then new text", 3, 200, (6100, 150)),
]


def token_ids(stack: Stack, i: int, spec: Any) -> list[int]:
    """The prompt's ids as the workers tokenize it, behind a tag of its own (so no cache
    holds any of it yet); a token-id prompt keeps its length exactly."""
    tag = f"[reuse {i}] "
    if isinstance(spec, list) and spec and isinstance(spec[0], int):
        head = httpx.post(f"{stack.reference_url}/tokenize", headers=WORKER_HEADERS,
                          timeout=30, json={"model": MODEL_NAME, "prompt": tag,
                                            "add_special_tokens": False}).json()["tokens"]
        return [*head, *spec[:len(spec) - len(head)]]
    body: dict[str, Any] = {"model": MODEL_NAME}
    if isinstance(spec, str):
        body["prompt"] = tag + spec
    else:
        body["messages"] = [{**spec[0], "content": tag + spec[0]["content"]}, *spec[1:]]
    r = httpx.post(f"{stack.reference_url}/tokenize", headers=WORKER_HEADERS, timeout=30,
                   json=body)
    assert r.status_code == 200, r.text
    ids: list[int] = r.json()["tokens"]
    return ids


def answer(url: str, ids: list[int]) -> tuple[list[int], int]:
    """Greedy tokens and the cached prompt tokens the worker reported."""
    r = httpx.post(f"{url}/v1/completions", timeout=300, headers=WORKER_HEADERS, json={
        "model": MODEL_NAME, "prompt": ids, "max_tokens": 12, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["token_ids"], body["usage"]["prompt_tokens_details"][
        "cached_tokens"]


def test_every_prompt_is_loaded_from_the_pool_and_answered_exactly(stack: Stack) -> None:
    a, b = stack.worker_urls
    failures: list[str] = []
    noisy: list[str] = []
    served: list[list[int]] = []
    assert len(PROMPTS) >= 24, "the issue asks for at least 24 varied prompts"
    cases = [(name, spec, 0) for name, spec in PROMPTS]
    # An extended prompt starts with an earlier one's blocks, which every worker (the
    # reference too: its "cold" answer then reuses them) already holds.
    for name, earlier, keep, (at, n) in EXTENDED:
        cases.append((name, ("extend", earlier, keep, at, n), keep // BLOCK * BLOCK))
    for i, (name, spec, local) in enumerate(cases):
        if isinstance(spec, tuple):  # B holds the shared blocks itself, the pool the rest
            _, earlier, keep, at, n = spec
            ids = served[earlier][:keep] + corpus()[at:at + n]
        else:
            ids = token_ids(stack, i, spec)
        served.append(ids)
        assert len(ids) > BLOCK, f"{name}: {len(ids)} tokens, not a loadable block"
        full = (len(ids) - 1) // BLOCK * BLOCK  # vLLM computes the block of the last token
        ref_cold, _ = answer(stack.reference_url, ids)
        ref_cached, ref_hit = answer(stack.reference_url, ids)
        got_a, a_hit = answer(a, ids)  # computes, and stores its full blocks in the pool
        before = metrics(b)
        got_b, b_hit = answer(b, ids)  # the rest of its full blocks come from the pool
        from_pool = delta(metrics(b), before, "beluga_worker_prompt_tokens_total:pool")
        checks = {
            "the reference's cached answer hit its prefix cache": ref_hit == full,
            "A computed what it did not hold": a_hit == local,
            "A equals the reference's cold answer": got_a == ref_cold,
            "B found exactly the full blocks cached": b_hit == full,
            "B loaded all but its own blocks from the pool": from_pool == full - local,
            "B equals the reference's cached answer": got_b == ref_cached,
        }
        if ref_cold == ref_cached:
            checks["B equals the reference's cold answer"] = got_b == ref_cold
        else:
            noisy.append(f"{name} ({len(ids)} tokens)")
        failures += [f"{name} ({len(ids)} tokens, {full} in full blocks): {what}"
                     for what, ok in checks.items() if not ok]
    assert not failures, failures
    lengths = sorted(len(ids) for ids in served)
    assert lengths[0] <= 2 * BLOCK and lengths[-1] >= 2500  # one block to thousands
    if noisy:  # said per prompt; never a reason to pass
        warnings.warn(f"reference cold != cached (numeric noise of a split prefill): "
                      f"{noisy}", stacklevel=1)
    # The cold comparison must keep its weight: one prompt of 26 (the 3,000-token document)
    # has shown the noise in every run so far; a quarter would be a change to look at.
    assert len(noisy) <= len(cases) // 4, f"cold answers compared for too few: {noisy}"
