"""The connector from a plain vLLM server (the way LMCache users adopt LMCache): `python -m
vllm.entrypoints.openai.api_server ... --kv-transfer-config '{"kv_connector":
"BelugaConnector", "kv_connector_module_path": "engine.connector", ...}'`, started by hand
with no Beluga setting in its environment, on the session stack's pool, shares blocks with
the stack's `beluga worker`s both ways: each side loads every full block the other computed
(the plain server then answers, token for token, as the worker that computed them does from
its own cache; the two workers loading the plain server's blocks answer alike).
(README, "Using the connector from plain vLLM".)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from beluga.settings import Settings
from beluga_cli.up import worker_cores
from engine.worker import resolve_dtype
from tests.e2e.conftest import BLOCK, LORA_NAME, MODEL, MODEL_NAME, ROOT, Stack, free_port
from tests.e2e.pool_helpers import corpus, delta, metrics
from tests.e2e.test_reuse import answer

START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def plain(stack: Stack) -> Iterator[str]:
    port = free_port()
    config = {"kv_connector": "BelugaConnector", "kv_connector_module_path": "engine.connector",
              "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {"pool_path": str(stack.pool_path),
                                            "pool_size_gib": 1}}
    # The same engine settings as the stack's workers (the pool's fingerprint covers the
    # served name, dtype and block size), computing on the cores of the stack's first
    # worker with as many threads (its answers are compared bit for bit).
    shares = worker_cores(sorted(os.sched_getaffinity(0)), 2, 1)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--block-size", str(BLOCK), "--max-model-len", "4096",
           "--dtype", resolve_dtype("auto", cuda=False), "--enable-prompt-tokens-details",
           "--enforce-eager",  # as `beluga worker` runs (docs/cpu.md: the compiled graph)
           "--max-num-seqs", str(Settings().max_num_seqs),
           # the session's workers serve a LoRA adapter beside the model, which changes the
           # base model's arithmetic: the same here, for answers equal token for token
           "--enable-lora", "--lora-modules", f"{LORA_NAME}={stack.state_dir / 'lora'}",
           "--kv-transfer-config", json.dumps(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BELUGA_", "VLLM_"))}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": shares[0] if shares is not None else "auto"})
    log = stack.state_dir / "plain-vllm.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"plain vLLM did not start:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        said = log.read_text(errors="replace")
        assert "BelugaConnector" in said, said[-3000:]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def tagged(url: str, tag: str, at: int, n: int) -> list[int]:
    """`tag`'s tokens, then corpus tokens: a prompt no worker has seen."""
    r = httpx.post(f"{url}/tokenize", timeout=30, json={
        "model": MODEL_NAME, "prompt": tag, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return [*r.json()["tokens"], *corpus()[at:at + n]]


def test_plain_vllm_and_beluga_workers_share_blocks_both_ways(stack: Stack, plain: str) -> None:
    a, b = stack.worker_urls
    # A beluga worker computes; the plain server loads its full blocks from the pool.
    ids = tagged(plain, "Plain vLLM shares with Beluga, direction one:", 4100, 300)
    full = (len(ids) - 1) // BLOCK * BLOCK
    _, a_hit = answer(a, ids)
    a_cached, a_hit_again = answer(a, ids)
    assert (a_hit, a_hit_again) == (0, full)
    got, plain_hit = answer(plain, ids)
    assert plain_hit == full, "the plain server did not find the blocks in the pool"
    assert got == a_cached
    # The plain server computes; both beluga workers load its full blocks from the pool and
    # answer alike. (Their answer is not compared with the plain server's own: on this
    # 2-core machine the second stack worker and the plain server differ in the last bits of
    # a split prefill, as test_reuse.py's numeric-noise cases do.)
    ids = tagged(plain, "Plain vLLM shares with Beluga, direction two:", 4500, 300)
    full = (len(ids) - 1) // BLOCK * BLOCK
    _, cold_hit = answer(plain, ids)
    assert cold_hit == 0
    answers = []
    for w in (a, b):
        before = metrics(w)
        got, hit = answer(w, ids)
        assert hit == full
        assert delta(metrics(w), before, "beluga_worker_prompt_tokens_total:pool") == full
        answers.append(got)
    assert answers[0] == answers[1]
