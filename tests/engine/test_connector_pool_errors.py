"""The connector's two sides meet a pool in trouble (a real pool file, its lock held by a
frozen child process, or a scribbled value) and serve without it: no exception into vLLM,
no long stall, every failure counted by kind.

The sides are built as vLLM builds them, from stand-ins for vLLM's config objects (only the
fields the connector reads) and, on the worker side, CPU tensors as the paged KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine.connector import (
    ConnectorConfig,
    GiB,
    _SchedulerSide,
    _WorkerSide,
)
from engine.connector_meta import LoadSpec, SaveSpec, StepPlan
from kvpool import KVPool, block_keys
from tests.support import pool_lock_held, scribble_clock_hand, scribble_index

BLOCK = 16        # tokens per block
HEADS, HEAD = 2, 8
LAYERS = ("layer.0", "layer.1")
NUM_BLOCKS = 32   # engine blocks
PAGE = HEADS * BLOCK * 2 * HEAD * 4  # bytes of one block of one layer (float32, K and V)
SLOTS = 64
FAST = 0.9        # "well under a second": the default lock timeout is 0.5 s


def vllm_config() -> Any:
    model = SimpleNamespace(served_model_name="test-model", revision=None, dtype="float32",
                            get_num_kv_heads=lambda parallel: HEADS,
                            get_head_size=lambda: HEAD,
                            get_num_layers=lambda parallel: len(LAYERS))
    return SimpleNamespace(
        model_config=model,
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=BLOCK),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1))


def kv_cache_config() -> Any:
    spec = SimpleNamespace(block_size=BLOCK, page_size_bytes=PAGE)
    group = SimpleNamespace(kv_cache_spec=spec, layer_names=list(LAYERS))
    return SimpleNamespace(kv_cache_groups=[group], num_blocks=NUM_BLOCKS)


def config(path: Path, **kw: Any) -> ConnectorConfig:
    return ConnectorConfig(pool_path=path, pool_size_gib=SLOTS * PAGE * len(LAYERS) / GiB,
                           **kw)


def request(req_id: str, tokens: list[int]) -> Any:
    return SimpleNamespace(request_id=req_id, num_tokens=len(tokens), all_token_ids=tokens,
                           prompt_token_ids=tokens, cache_salt=None, block_hashes=[],
                           num_computed_tokens=0, mm_features=[], lora_request=None,
                           prompt_embeds=None)


TOKENS = list(range(5000, 5000 + 5 * BLOCK))  # 5 blocks: the pool may supply 4


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[_SchedulerSide]:
    side = _SchedulerSide(config(tmp_path / "kv.pool"), vllm_config(), kv_cache_config())
    assert side.pool is not None
    yield side
    side.close()


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_WorkerSide]:
    # No tensor-parallel group in a test process: rank 0, as vLLM's would say.
    import vllm.distributed.parallel_state as ps
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 0)
    side = _WorkerSide(config(tmp_path / "kv.pool"), vllm_config(), kv_cache_config())
    assert side.pool is not None
    side.register({name: torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD)
                   for name in LAYERS})
    assert side.layout is not None and side.layout.block_bytes == side.pool.slot_size
    yield side
    side.close()


def stored(path: Path, fingerprint: bytes, n: int) -> list[bytes]:
    """Put the first `n` blocks of TOKENS in the pool (another process's handle)."""
    keys = block_keys(TOKENS, BLOCK, fingerprint)
    with KVPool.attach(path) as other:
        assert other.put(keys[:n], [b"k" * (PAGE * len(LAYERS))] * n).stored == n
    return keys


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


# --- scheduler side ---------------------------------------------------------------------

def test_the_config_takes_a_short_lock_timeout(tmp_path: Path) -> None:
    cfg = config(tmp_path / "x.pool")
    assert cfg.lock_timeout_s == 0.5 and cfg.busy_backoff_s == 2.0
    for bad in ({"lock_timeout_s": 0}, {"lock_timeout_s": -1}, {"lock_timeout_s": 61},
                {"busy_backoff_s": -1}):
        with pytest.raises(ValueError):
            config(tmp_path / "x.pool", **bad)


def test_scheduler_a_busy_pool_matches_nothing_quickly_and_counts(
        sched: _SchedulerSide, tmp_path: Path) -> None:
    path = tmp_path / "kv.pool"
    stored(path, sched.geo.fingerprint, 4)
    assert sched.matched_tokens(request("a", TOKENS), 0) == 4 * BLOCK  # pinned: a promise
    with pool_lock_held(path):
        n, dt = timed(sched.matched_tokens, request("b", TOKENS), 0)
        assert n == 0 and dt < FAST
        assert sched.stats.pool_errors() == {"busy": 1}
        # Backing off: the next request does not wait for the lock again.
        n, dt = timed(sched.matched_tokens, request("c", TOKENS), 0)
        assert n == 0 and dt < 0.2
        assert sched.stats.pool_errors() == {"busy": 1}
        # Releasing a promise while the lock is held: deferred, never raised.
        _, dt = timed(sched.finished, "a")
        assert dt < FAST
        sched.steps_done({1, 2}, set())
    sched.backoff = type(sched.backoff)(0.0)
    # The holder is gone: the pool serves again (its lock taken over, the pins settled).
    assert sched.matched_tokens(request("d", TOKENS), 0) == 4 * BLOCK
    sched.finished("d")
    taken = sched.stats.take()
    assert taken is not None and taken.data["pool_errors:busy"] == 1


def test_scheduler_a_corrupt_pool_matches_nothing_once_then_heals(
        sched: _SchedulerSide, tmp_path: Path) -> None:
    path = tmp_path / "kv.pool"
    stored(path, sched.geo.fingerprint, 4)
    scribble_index(path)
    n, dt = timed(sched.matched_tokens, request("a", TOKENS), 0)
    assert n == 0 and dt < FAST
    assert sched.stats.pool_errors() == {"corrupt": 1}
    # The pool was marked: the next call rebuilds the index from the slots.
    assert sched.matched_tokens(request("b", TOKENS), 0) == 4 * BLOCK
    sched.finished("b")
    assert sched.stats.pool_errors() == {"corrupt": 1}


def test_scheduler_a_closed_handle_is_counted_not_raised(sched: _SchedulerSide,
                                                         tmp_path: Path) -> None:
    stored(tmp_path / "kv.pool", sched.geo.fingerprint, 4)
    assert sched.matched_tokens(request("a", TOKENS), 0) == 4 * BLOCK
    assert sched.pool is not None
    sched.pool.close()  # (as if detached under it)
    sched.finished("a")  # unpin: PoolClosedError, counted
    assert sched.matched_tokens(request("b", TOKENS), 0) == 0
    assert sched.stats.pool_errors() == {"closed": 2}


def test_a_non_pool_error_is_a_bug_and_propagates(sched: _SchedulerSide) -> None:
    with pytest.raises(AttributeError):
        sched.matched_tokens(SimpleNamespace(request_id="x"), 0)  # not a request


# --- worker side ------------------------------------------------------------------------

def save_plan(step: int, keys: list[bytes], blocks: list[int]) -> StepPlan:
    return StepPlan(step, saves=(SaveSpec("r", tuple(keys), tuple(blocks)),))


def test_worker_a_busy_pool_skips_the_save_quickly_and_counts(worker: _WorkerSide,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "kv.pool"
    keys = block_keys(TOKENS, BLOCK, b"\x01" * 32)
    with pool_lock_held(path):
        _, dt = timed(worker.save, save_plan(1, keys[:2], [0, 1]))
        assert dt < FAST
        assert worker.stats.pool_errors() == {"busy": 1}
        assert worker.stats.data["save_errors"] == 2
        _, dt = timed(worker.save, save_plan(2, keys[2:4], [2, 3]))  # backing off
        assert dt < 0.2 and worker.stats.pool_errors() == {"busy": 1}
    worker.backoff = type(worker.backoff)(0.0)
    worker.save(save_plan(3, keys[:2], [0, 1]))
    assert worker.stats.data["blocks_saved"] == 2
    with KVPool.attach(path) as other:
        assert other.lookup_prefix(keys) == 2


def test_worker_a_corrupt_pool_skips_one_save_then_heals(worker: _WorkerSide,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "kv.pool"
    keys = block_keys(TOKENS, BLOCK, b"\x02" * 32)
    scribble_clock_hand(path)
    _, dt = timed(worker.save, save_plan(1, keys[:3], [0, 1, 2]))
    assert dt < FAST
    assert worker.stats.pool_errors() == {"corrupt": 1}
    assert worker.stats.data["save_errors"] == 3 and "blocks_saved" not in worker.stats.data
    worker.save(save_plan(2, keys[:3], [0, 1, 2]))  # rebuilt: the CLOCK hand is back in range
    assert worker.stats.data["blocks_saved"] == 3
    assert worker.stats.pool_errors() == {"corrupt": 1}


def test_worker_a_failed_load_is_recomputed_and_counted(worker: _WorkerSide,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "kv.pool"
    keys = block_keys(TOKENS, BLOCK, b"\x03" * 32)
    worker.save(save_plan(1, keys[:2], [0, 1]))
    with KVPool.attach(path) as other:
        slots = other.pin(keys[:2])
        assert worker.pool is not None
        worker.pool.close()  # (as if detached under it)
        plan = StepPlan(2, loads=(LoadSpec("r", tuple(slots), (5, 6), tuple(keys[:2])),))
        worker.load(plan)
        other.unpin(slots)
    assert worker.take_load_errors() == {5, 6}
    assert worker.stats.pool_errors() == {"closed": 1}
    meta = worker.take_done_steps()
    assert meta is not None and meta.steps() == {2} and meta.bad() == set()  # kept in the pool
    worker.save(save_plan(3, keys[2:4], [2, 3]))  # closed: counted, skipped
    assert worker.stats.pool_errors() == {"closed": 2}
    worker.close()


# --- what block keys cannot express never touches the pool ---------------------------------

def test_requests_keys_cannot_express_never_touch_the_pool(
        sched: _SchedulerSide, tmp_path: Path) -> None:
    """Multimodal inputs, prompt embeddings, an adapter whose files cannot be read or
    changed since it was first met: no keys, no pins, no saves, counted once each."""
    from kvpool.keys import Adapter, adapter_digest

    assert sched.pool is not None
    sched.pool.put(block_keys(TOKENS, BLOCK, sched.geo.fingerprint)[:4], [b"x" * 100] * 4)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"r": 8}')
    (lora / "adapter_model.safetensors").write_bytes(b"\1" * 64)

    def req(name: str, **kw: Any) -> Any:
        r = request(name, TOKENS)
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    plain = req("plain")
    assert sched.matched_tokens(plain, 0) == 4 * BLOCK  # the base model's blocks
    unshared = [req("mm", mm_features=[object()]), req("embeds", prompt_embeds=object()),
                req("gone", lora_request=SimpleNamespace(lora_name="x", lora_path="/nope"))]
    for r in unshared:
        assert sched.matched_tokens(r, 0) == 0
    adapter = SimpleNamespace(lora_name="sql", lora_path=str(lora))
    assert sched.matched_tokens(req("sql", lora_request=adapter), 0) == 0  # other keys
    keys = sched._keys(sched._track(req("sql2", lora_request=adapter)), len(TOKENS))
    assert keys == block_keys(TOKENS, BLOCK, sched.geo.fingerprint,
                              adapter=Adapter("sql", adapter_digest(lora)))
    (lora / "adapter_model.safetensors").write_bytes(b"\2" * 65)  # rewritten in place
    changed = req("sql3", lora_request=adapter)
    assert sched.matched_tokens(changed, 0) == 0 and sched._keys(sched._track(changed), 64) == []
    assert sched.stats.reduce()["unshared_requests"] == 4
    sched.finished(plain.request_id)
