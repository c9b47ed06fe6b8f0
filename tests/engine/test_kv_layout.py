"""Copy segments of one KV block, for the paged layouts vLLM's backends use."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
import torch

from engine.kv_layout import LayoutError, block_layout
from kvpool import KVPool, cuda_device_count


def cpu_cache(blocks: int = 6, heads: int = 3, tokens: int = 4, head: int = 8) -> torch.Tensor:
    # vLLM's CPU backend: [blocks, kv_heads, block_size, 2 * head_size]
    return torch.randn(blocks, heads, tokens, 2 * head, dtype=torch.bfloat16)


def test_cpu_layout_is_one_segment_per_layer_in_layer_order() -> None:
    caches = {"l0": cpu_cache(), "l1": cpu_cache()}
    lay = block_layout(caches, ["l1", "l0"], 6)
    per_block = 3 * 4 * 16 * 2
    assert lay.block_bytes == 2 * per_block
    assert lay.segments == ((caches["l1"].data_ptr(), per_block, per_block),
                            (caches["l0"].data_ptr(), per_block, per_block))
    assert lay.device == torch.device("cpu")


def test_flash_layout_gives_k_and_v_segments() -> None:
    # flash-attention: [2, blocks, block_size, kv_heads, head_size]
    t = torch.zeros(2, 6, 4, 3, 8, dtype=torch.float16)
    lay = block_layout({"l0": t}, ["l0"], 6)
    block = 4 * 3 * 8 * 2
    assert lay.segments == ((t.data_ptr(), block, block),
                            (t.data_ptr() + 6 * block, block, block))


def test_kernel_blocks_smaller_than_scheduler_blocks_are_merged() -> None:
    t = torch.zeros(12, 2, 4, 8, dtype=torch.float32)  # 6 blocks of 2 kernel blocks each
    lay = block_layout({"l0": t}, ["l0"], 6)
    kernel = 2 * 4 * 8 * 4
    assert lay.segments == ((t.data_ptr(), 2 * kernel, 2 * kernel),)


def test_shared_layers_are_copied_once() -> None:
    t = cpu_cache()
    assert len(block_layout({"a": t, "b": t}, ["a", "b"], 6).segments) == 1


@pytest.mark.parametrize(("caches", "names", "blocks", "match"), [
    ({"l0": torch.zeros(5, 4)}, ["l0"], 6, "no dimension"),
    ({"l0": torch.zeros(6, 4)}, ["l1"], 6, "no KV cache tensor"),
    ({"l0": torch.zeros(4, 6).t()}, ["l0"], 6, "not contiguous"),
    ({"l0": torch.zeros(6, 4)}, ["l0"], 0, "must be positive"),
])
def test_layouts_the_pool_cannot_copy_are_refused(caches: dict[str, torch.Tensor],
                                                  names: list[str], blocks: int,
                                                  match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        block_layout(caches, names, blocks)


def test_pool_round_trip_through_the_layout(tmp_path: Path) -> None:
    """gather with these segments, scatter into a fresh cache: the blocks arrive intact."""
    src = {"l0": cpu_cache(), "l1": cpu_cache()}
    lay = block_layout(src, ["l0", "l1"], 6)
    fp = hashlib.sha256(b"layout").digest()
    with KVPool.create(tmp_path / "p.pool", slot_size=lay.block_bytes,
                       slot_count=4, fingerprint=fp) as pool:
        keys = [hashlib.sha256(b"%d" % i).digest() for i in range(2)]
        slots = [r.slot for r in pool.prepare_store(keys)]
        sums = pool.gather(slots, [4, 1], lay.segments)
        pool.complete_store(slots, [lay.block_bytes] * 2, checksums=sums)
        dst = {n: torch.zeros_like(t) for n, t in src.items()}
        dlay = block_layout(dst, ["l0", "l1"], 6)
        with pool.pinned(keys) as pinned:
            assert pool.scatter(pinned, [0, 5], dlay.segments) == []
    for n in src:
        assert torch.equal(dst[n][0], src[n][4]) and torch.equal(dst[n][5], src[n][1])
        assert not dst[n][1:5].any()


@pytest.mark.skipif(not torch.cuda.is_available() or cuda_device_count() == 0,
                    reason="needs a CUDA device (and beluga_native built with nvcc)")
def test_gpu_flash_layout_moves_blocks_between_two_engines() -> None:
    """vLLM's CUDA layout ([2, blocks, block_size, kv_heads, head_size] per layer, bf16):
    engine A saves four blocks through the pool, engine B (its own cache, other block ids)
    loads them; B's blocks equal A's in every layer, K and V, and nothing else changed."""
    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    gen = torch.Generator(device="cuda").manual_seed(3)
    a = {n: torch.randn(2, 40, 16, 8, 128, dtype=torch.bfloat16, device="cuda", generator=gen)
         for n in names}
    b = {n: torch.zeros(2, 32, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for n in names}
    la, lb = block_layout(a, names, 40), block_layout(b, names, 32)
    assert la.block_bytes == lb.block_bytes == 4 * 2 * 16 * 8 * 128 * 2
    assert la.device.type == "cuda" and len(la.segments) == 8
    fp = hashlib.sha256(b"gpu-layout").digest()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d, \
            KVPool.create(Path(d) / "p.pool", slot_size=la.block_bytes, slot_count=8,
                          fingerprint=fp) as pool:
        keys = [hashlib.sha256(b"g%d" % i).digest() for i in range(4)]
        slots = [r.slot for r in pool.prepare_store(keys)]
        sums = pool.gather_cuda(slots, [39, 0, 17, 5], la.segments,
                                stream=torch.cuda.current_stream().cuda_stream)
        pool.complete_store(slots, [la.block_bytes] * 4, checksums=sums)
        with pool.pinned(keys) as pinned:
            assert pool.scatter_cuda(pinned, [1, 2, 30, 31], lb.segments) == []
    for n in names:
        assert torch.equal(b[n][:, [1, 2, 30, 31]], a[n][:, [39, 0, 17, 5]])
        assert not b[n][:, [0, *range(3, 30)]].any()
