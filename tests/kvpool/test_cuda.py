"""The GPU copy path. Tests that need a device skip themselves where none is visible; the
typed-error tests run everywhere."""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvpool import KVPool, PoolArgumentError, PoolCudaError, cuda_built, cuda_device_count
from tests.kvpool.conftest import FP, key, reserve

MakePool = Callable[..., KVPool]
HAS_GPU = cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where no GPU is usable")
def test_gpu_copy_without_a_device_is_a_typed_error(make_pool: MakePool) -> None:
    pool = make_pool()
    slots = reserve(pool, [key(1)])
    with pytest.raises(PoolCudaError, match="without CUDA" if not cuda_built()
                       else "no CUDA device"):
        pool.gather_cuda(slots, [0], [(0x1000, 4096, 4096)])
    pool.complete_store(slots, ok=False)
    assert pool.stats().used_slots == 0


def test_gpu_copy_checks_arguments_before_touching_cuda(make_pool: MakePool) -> None:
    pool = make_pool()
    with pytest.raises(PoolArgumentError, match="negative block id"):
        pool.scatter_cuda([0], [-1], [(0x1000, 4096, 4096)], keys=[key(1)])
    with pytest.raises(PoolArgumentError, match="differ in length"):
        pool.scatter_cuda([0, 1], [0], [(0x1000, 4096, 4096)])
    with pytest.raises(PoolArgumentError, match="not pinned by this handle"):
        pool.scatter_cuda([0], [0], [(0x1000, 4096, 4096)])
    with pytest.raises(PoolArgumentError, match="not reserved by this handle"):
        pool.gather_cuda([0], [0], [(0x1000, 4096, 4096)])
    with pytest.raises(PoolArgumentError, match="bytes per block"):
        pool.gather_cuda([0], [0], [(0x1000, 8192, 8192)])
    slots = reserve(pool, [key(1)])
    with pytest.raises(PoolArgumentError, match="threads must be at least 1"):
        pool.gather_cuda(slots, [0], [(0x1000, 4096, 4096)], threads=0)
    with pytest.raises(PoolArgumentError, match="wraps"):
        pool.gather_cuda(slots, [2**62], [(0x1000, 4096, 4096)])
    pool.complete_store(slots, ok=False)


@pytest.fixture
def shm_pool() -> Iterator[Callable[..., KVPool]]:
    """Pools on /dev/shm, where a deployment keeps them: a GPU pins shared memory, while
    recent kernels refuse long-term pins of files on disk filesystems."""
    opened: list[KVPool] = []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        def make(**kw: object) -> KVPool:
            args: dict[str, object] = {"slot_size": 4096, "slot_count": 16, "fingerprint": FP}
            args.update(kw)
            pool = KVPool.create(Path(d) / f"gpu{len(opened)}.pool", **args)  # type: ignore[arg-type]
            opened.append(pool)
            return pool

        yield make
        for p in opened:
            p.close()


@needs_gpu
@pytest.mark.parametrize("coherence", ["none", "flush"])
def test_gpu_gather_then_scatter_round_trips_paged_blocks(shm_pool: MakePool,
                                                          coherence: str) -> None:
    torch = pytest.importorskip("torch")
    layers, blocks, block_bytes = 3, 8, 1024
    pool = shm_pool(slot_size=layers * block_bytes, coherence=coherence)
    # A paged cache per layer: [blocks, block_bytes] uint8 on the GPU, random content.
    gen = torch.Generator(device="cuda").manual_seed(7)
    src = [torch.randint(0, 256, (blocks, block_bytes), dtype=torch.uint8, device="cuda",
                         generator=gen) for _ in range(layers)]
    segs = [(t.data_ptr(), block_bytes, block_bytes) for t in src]
    keys = [key(i) for i in range(4)]
    slots = reserve(pool, keys)
    engine_blocks = [5, 1, 7, 2]
    pool.gather_cuda(slots, engine_blocks, segs)
    pool.complete_store(slots, [layers * block_bytes] * 4)

    # The pool holds exactly the GPU bytes, layer after layer, as a CPU reader sees them.
    for k, b in zip(keys, engine_blocks, strict=True):
        want = b"".join(bytes(t[b].cpu().numpy().tobytes()) for t in src)
        assert pool.get([k])[0] == want

    dst = [torch.zeros_like(t) for t in src]
    with pool.pinned(keys) as pinned:
        pool.scatter_cuda(pinned, [0, 3, 4, 6], [(t.data_ptr(), block_bytes, block_bytes)
                                                  for t in dst],
                          stream=torch.cuda.current_stream().cuda_stream)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[[0, 3, 4, 6]], s[engine_blocks])
        assert int(d[[1, 2, 5, 7]].sum()) == 0  # untouched blocks stay untouched
    assert pool.stats().pinned_slots == 0


@needs_gpu
def test_gpu_copy_handles_unaligned_segments(shm_pool: MakePool) -> None:
    torch = pytest.importorskip("torch")
    pool = shm_pool(slot_size=4096)
    src = torch.arange(0, 1000, dtype=torch.uint8, device="cuda").reshape(10, 100)
    slots = reserve(pool, [key(9)])
    pool.gather_cuda(slots, [3], [(src.data_ptr() + 1, 100, 37)])
    pool.complete_store(slots, [37])
    assert pool.get([key(9)])[0] == bytes(src.flatten()[301:338].cpu().numpy().tobytes())


@needs_gpu
@pytest.mark.parametrize(("host_hash", "threads", "chunk_bytes"), [
    (False, 4, 4 << 20), (True, 1, 0), (True, 1, 2 << 20), (True, 3, 2 << 20),
    (True, 8, 1 << 20)])
def test_gpu_copies_hash_and_verify_every_block(shm_pool: MakePool, host_hash: bool,
                                                threads: int, chunk_bytes: int) -> None:
    """24 MiB, hashed by the copy kernel or, in chunks, by host threads while the GPU copies:
    every checksum is the CPU's hash of the block (so a GPU worker's blocks verify on a CPU
    worker and back), and a block scribbled in the pool is reported at its own position,
    wherever its chunk is."""
    torch = pytest.importorskip("torch")
    blocks, half = 24, 512 << 10
    pool = shm_pool(slot_size=2 * half, slot_count=blocks)
    gen = torch.Generator(device="cuda").manual_seed(11)
    k_cache, v_cache = (torch.randint(0, 256, (2 * blocks, half), dtype=torch.uint8,
                                      device="cuda", generator=gen) for _ in range(2))
    segs = [(t.data_ptr(), half, half) for t in (k_cache, v_cache)]
    keys = [key(100 + i) for i in range(blocks)]
    engine_blocks = list(range(2 * blocks - 1, 0, -2))  # every other block, backwards
    slots = reserve(pool, keys)
    sums = pool.gather_cuda(slots, engine_blocks, segs, threads=threads,
                            chunk_bytes=chunk_bytes, host_hash=host_hash)
    want = [hashlib.sha256(bytes(k_cache[b].cpu().numpy()) + bytes(v_cache[b].cpu().numpy()))
            .digest() for b in engine_blocks]
    assert sums == [pool._p.compute_checksum(s, 2 * half) for s in slots]
    pool.complete_store(slots, [2 * half] * blocks, checksums=sums)
    assert [hashlib.sha256(pool.get([k])[0]).digest() for k in keys] == want

    # Scribble on three published blocks (first, middle, last chunk), then load them all.
    with pool.pinned(keys) as pinned:
        for i in (0, 13, 23):
            ctypes.c_uint8.from_address(pool._p.slot_address(pinned[i]) + 4096 + i).value ^= 0xFF
        dst_k, dst_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        failed = pool.scatter_cuda(pinned, list(range(blocks)),
                                   [(t.data_ptr(), half, half) for t in (dst_k, dst_v)],
                                   threads=threads, chunk_bytes=chunk_bytes,
                                   host_hash=host_hash)
    assert failed == [0, 13, 23]
    good = [i for i in range(blocks) if i not in failed]
    assert torch.equal(dst_k[good], k_cache[[engine_blocks[i] for i in good]])
    assert torch.equal(dst_v[good], v_cache[[engine_blocks[i] for i in good]])
    assert not dst_k[blocks:].any()


@needs_gpu
def test_segments_not_in_whole_words_are_hashed_on_the_host(shm_pool: MakePool) -> None:
    """A block of two 37-byte segments: the second starts mid-word, so the kernel cannot
    compute the block's checksum; the host does, and the result is the same checksum."""
    torch = pytest.importorskip("torch")
    pool = shm_pool(slot_size=128)  # slots are whole cache lines; a block may be shorter
    a = torch.randint(0, 256, (4, 40), dtype=torch.uint8, device="cuda")
    b = torch.randint(0, 256, (4, 40), dtype=torch.uint8, device="cuda")
    segs = [(a.data_ptr(), 40, 37), (b.data_ptr(), 40, 37)]
    keys = [key(200), key(201)]
    slots = reserve(pool, keys)
    sums = pool.gather_cuda(slots, [2, 0], segs)
    assert sums == [pool._p.compute_checksum(s, 74) for s in slots]
    pool.complete_store(slots, [74, 74], checksums=sums)
    assert pool.get(keys) == [bytes(a[2, :37].cpu().numpy()) + bytes(b[2, :37].cpu().numpy()),
                              bytes(a[0, :37].cpu().numpy()) + bytes(b[0, :37].cpu().numpy())]
    c, d = torch.zeros_like(a), torch.zeros_like(b)
    with pool.pinned(keys) as pinned:
        assert pool.scatter_cuda(pinned, [1, 3], [(c.data_ptr(), 40, 37),
                                                  (d.data_ptr(), 40, 37)]) == []
    assert torch.equal(c[1, :37], a[2, :37]) and torch.equal(d[3, :37], b[0, :37])


SAVER = """
import sys, torch
from kvpool import KVPool
from tests.kvpool.conftest import FP, key, reserve
pool = KVPool.attach(sys.argv[1], fingerprint=FP)
gen = torch.Generator(device="cuda").manual_seed(21)
cache = torch.randint(0, 256, (2, 16, 8192), dtype=torch.uint8, device="cuda", generator=gen)
segs = [(cache[i].data_ptr(), 8192, 8192) for i in range(2)]
keys = [key(400 + i) for i in range(4)]
slots = reserve(pool, keys)
pool.complete_store(slots, [16384] * 4, checksums=pool.gather_cuda(slots, [9, 2, 15, 4], segs))
pool.close()
"""


@needs_gpu
def test_one_process_saves_from_its_gpu_and_another_loads_onto_its_own(
        shm_pool: MakePool) -> None:
    """Two workers on one host: a separate process attaches the pool, registers it with the
    GPU and saves four blocks from its cache; this process, holding its own registration of
    the same mapping, loads them into another cache and gets the saver's bytes."""
    torch = pytest.importorskip("torch")
    pool = shm_pool(slot_size=16384, slot_count=8)
    pool.cuda_register()  # registered here first: the saver registers the same pages again
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", SAVER, pool.path], cwd=root, check=True, timeout=120)
    gen = torch.Generator(device="cuda").manual_seed(21)
    want = torch.randint(0, 256, (2, 16, 8192), dtype=torch.uint8, device="cuda",
                         generator=gen)
    mine = torch.zeros(2, 6, 8192, dtype=torch.uint8, device="cuda")
    keys = [key(400 + i) for i in range(4)]
    with pool.pinned(keys) as pinned:
        assert len(pinned) == 4
        assert pool.scatter_cuda(pinned, [5, 0, 3, 1],
                                 [(mine[i].data_ptr(), 8192, 8192) for i in range(2)]) == []
    assert torch.equal(mine[:, [5, 0, 3, 1]], want[:, [9, 2, 15, 4]])
    assert not mine[:, [2, 4]].any()
