"""Pool transfer benchmark: plain memcpy vs Beluga put/get (both coherence modes) vs
Mooncake Store over TCP, for block sizes 64 KiB..4 MiB and 1, 2, 4 concurrent processes.

    python bench/pool_transfer.py --quick --json OUT.json

Every configuration runs in this one invocation on the same machine. Each process copies
blocks between one fixed buffer and a region as large as the pool (so small blocks do not
live in cache on one side only); memcpy does exactly that between two plain buffers and is
the limit. Beluga put = prepare_store + copy + complete_store per block; get = pin + copy +
unpin per block: the whole protocol, one block per call. Throughput is all processes'
bytes over the wall time between a common start and the last finish. Where hugetlbfs can be
had (an existing mount with room, or as root a temporary one), Beluga also runs on 2 MiB
pages (`beluga_huge*`).

The run ends with the GPU section (`bench_cuda`; alone: `--cuda-only`), which needs a CUDA
device: a 2,048-token prefix of a Llama-3-8B-shaped KV cache saved and loaded through the
pool, against a torch connector and the DMA limit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import mooncake_peer  # noqa: E402
from kvpool import KVPool, PoolError, PoolIOError, cuda_device_count, hugetlbfs  # noqa: E402

FP = b"bench".ljust(32, b"\0")
BATCH = 16  # blocks per call in the batched configuration (the connector moves whole requests)
# (row name, coherence, blocks per call)
CONFIGS = [("beluga_none", "none", 1), ("beluga_flush", "flush", 1),
           ("beluga_batch", "none", BATCH)]
# The same on a hugetlbfs backing (2 MiB pages), where one can be had (see kvpool.hugetlbfs).
HUGE_CONFIGS = [("beluga_huge", "none", 1), ("beluga_huge_batch", "none", BATCH)]
KiB, MiB = 1024, 1024 * 1024


def key(tag: int, i: int) -> bytes:
    return hashlib.sha256(b"%d/%d" % (tag, i)).digest()  # as block keys are


# ----------------------------------------------------------------------------------------
# child: one process doing one kind of transfer
# ----------------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> dict[str, Any]:
    size, iters, region = args.size, args.iters, args.region
    buf = np.frombuffer(os.urandom(size), dtype=np.uint8).copy()
    lat: list[float] = []
    kind = args.child
    if kind.startswith("memcpy_"):
        # The same access pattern as put (small buffer -> large region) and get (large
        # region -> small buffer), between two plain buffers. memcpy_shm_*: the region is a
        # mapped /dev/shm file, as the pool is (shared memory may get other page sizes).
        if "shm" in kind:
            fd, name = tempfile.mkstemp(dir="/dev/shm", prefix="beluga-memcpy-")
            os.ftruncate(fd, region)
            mapping = mmap.mmap(fd, region)
            os.close(fd)
            os.unlink(name)
            big = np.frombuffer(mapping, dtype=np.uint8)
            big[:] = 1
        else:
            big = np.ones(region, dtype=np.uint8)  # touched: no page faults in the timing
        big_addr, buf_addr = big.ctypes.data, buf.ctypes.data
        blocks = region // size
        while time.time() < args.start_at:
            time.sleep(0.0005)
        t0 = time.perf_counter()
        for i in range(iters):
            off = ((i * 7 + args.rank * 131) % blocks) * size
            s = time.perf_counter()
            if kind.endswith("write"):
                ctypes.memmove(big_addr + off, buf_addr, size)
            else:
                ctypes.memmove(buf_addr, big_addr + off, size)
            lat.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
    elif kind in ("put", "get"):
        pool = KVPool.attach(args.path, fingerprint=FP, coherence=args.coherence)
        addr = buf.ctypes.data
        native = pool._p
        batch = args.batch
        rounds = iters // batch
        if kind == "put":
            keys = [b"".join(key(1000 + args.rank, (args.round * rounds + i) * batch + j)
                             for j in range(batch)) for i in range(rounds)]
        else:
            keys = [b"".join(key(0, ((i * batch + j) * 7 + args.rank * 131) % args.populated)
                             for j in range(batch)) for i in range(rounds)]
        one = [(addr, 0, size)]  # the engine side: one buffer, block id 0
        while time.time() < args.start_at:
            time.sleep(0.0005)
        t0 = time.perf_counter()
        for i in range(rounds):
            s = time.perf_counter()
            if kind == "put":
                slots = [x for x in native.prepare_store(keys[i]) if x >= 0]
                if batch == 1:
                    for slot in slots:
                        native.write_ptr(slot, addr, size)
                else:
                    native.gather(slots, [0] * len(slots), one, 1)
                native.complete_store(slots, [size] * len(slots), True)
            else:
                slots = native.pin(keys[i])
                if len(slots) != batch:
                    raise SystemExit("get missed a populated block: the benchmark is broken")
                if batch == 1:
                    native.read_ptr(slots[0], addr, size)
                else:
                    native.scatter(slots, [0] * batch, one, 1)
                native.unpin(slots)
            lat.append((time.perf_counter() - s) / batch)  # per block
        wall = time.perf_counter() - t0
        iters = rounds * batch
        pool.close()
    else:
        raise SystemExit(f"unknown kind {kind}")
    return {"lat": lat, "bytes": size * iters, "wall": wall}


# ----------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------

def run_children(kind: str, procs: int, size: int, iters: int, extra: list[str]) -> dict[str, Any]:
    start_at = time.time() + 1.0 + 0.3 * procs
    cmds = [[sys.executable, __file__, "--child", kind, "--size", str(size), "--iters",
             str(iters), "--rank", str(r), "--start-at", str(start_at), *extra]
            for r in range(procs)]
    ps = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in cmds]
    outs = []
    for p in ps:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{kind} child failed")
        outs.append(json.loads(out))
    lat = sorted(x for o in outs for x in o["lat"])
    total = sum(o["bytes"] for o in outs)
    wall = max(o["wall"] for o in outs)
    return {"gbps": total / wall / 1e9, "p50_us": lat[len(lat) // 2] * 1e6,
            "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6}


def bench_beluga(size: int, procs: int, iters: int, region: int, coherence: str,
                 shm_dir: Path, rnd: int, batch: int) -> dict[str, dict[str, Any]]:
    path = shm_dir / f"bench-{coherence}-{size}.pool"
    slots = max(8, region // size)
    if path.exists():
        path.unlink()
    pool = KVPool.create(path, slot_size=size, slot_count=slots, fingerprint=FP,
                         coherence=coherence)  # type: ignore[arg-type]
    try:
        populated = slots // 2
        block = np.frombuffer(os.urandom(size), dtype=np.uint8)
        # Touch every slot once (no page faults in the timing), then keep half populated.
        for i in range(slots):
            pool.put([key(9, i)], [block])
        for i in range(slots):
            pool.remove(key(9, i))
        for i in range(populated):
            pool.put([key(0, i)], [block])
        common = ["--path", str(path), "--coherence", coherence, "--populated",
                  str(populated), "--round", str(rnd), "--batch", str(batch)]
        # get first: the put run evicts the populated blocks
        got = run_children("get", procs, size, iters, common)
        return {"get": got, "put": run_children("put", procs, size, iters, common)}
    finally:
        pool.close()
        path.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--no-mooncake", action="store_true", help="skip the Mooncake peer")
    ap.add_argument("--cuda-only", action="store_true",
                    help="only the GPU section (on a machine with a CUDA device)")
    ap.add_argument("--sizes", type=int, nargs="*", help="block sizes in bytes")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per configuration")
    ap.add_argument("--procs", type=int, nargs="*", help="process counts")
    ap.add_argument("--child")
    ap.add_argument("--size", type=int)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--start-at", type=float, default=0.0)
    ap.add_argument("--path")
    ap.add_argument("--coherence", default="none")
    ap.add_argument("--populated", type=int, default=1)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--region", type=int, default=256 * MiB)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.cuda_only:
        with tempfile.TemporaryDirectory(prefix="beluga-bench-", dir="/dev/shm") as d:
            cuda = bench_cuda(Path(d))
        print(json.dumps(cuda, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"summary": {"cuda": cuda}}, indent=2))
        return 0 if "skipped" not in cuda else 1
    if not args.no_mooncake:
        mooncake_peer.reexec_isolated()  # returns only if already isolated or impossible

    sizes = args.sizes or [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
    procs_list = args.procs or [1, 2, 4]
    region = 128 * MiB if args.quick else 256 * MiB
    budget = (256 if args.quick else 1024) * MiB  # bytes per configuration and process
    shm = Path(tempfile.mkdtemp(prefix="beluga-bench-", dir="/dev/shm"))
    stack = contextlib.ExitStack()
    configs = [(c, coh, b, shm) for c, coh, b in CONFIGS]
    huge_need = region + 64 * MiB  # one pool at a time, plus its metadata
    huge = hugetlbfs.find_mount(huge_need)
    huge_reason = None
    if huge is None:
        try:
            huge = stack.enter_context(hugetlbfs.temporary_mount(huge_need))
        except PoolIOError as exc:
            huge_reason = str(exc)
    if huge is not None:
        configs += [(c, coh, b, huge) for c, coh, b in HUGE_CONFIGS]
    rows: list[dict[str, Any]] = []
    mooncake = None if args.no_mooncake or mooncake_peer.unavailable_reason \
        else mooncake_peer.start()
    try:
        for size in sizes:
            iters = max(4 * BATCH, budget // size // BATCH * BATCH)
            for procs in procs_list:
                row: dict[str, Any] = {"block_bytes": size, "procs": procs}
                samples: dict[str, list[dict[str, Any]]] = {}
                for rep in range(args.repeat):  # alternate configurations, median of rounds
                    for name in ("memcpy_write", "memcpy_read", "memcpy_shm_write",
                                 "memcpy_shm_read"):
                        samples.setdefault(name, []).append(run_children(
                            name, procs, size, iters, ["--region", str(region // 2 // procs)]))
                    for config, coherence, batch, where in configs:
                        res = bench_beluga(size, procs, iters, region, coherence, where,
                                           len(rows) * args.repeat + rep, batch)
                        for op, r in res.items():
                            samples.setdefault(f"{config}/{op}", []).append(r)
                for name, runs in samples.items():
                    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    if "/" in name:
                        config, op = name.split("/")
                        row.setdefault(config, {})[op] = med
                    else:
                        row[name] = med
                if mooncake is not None:
                    row["mooncake"] = mooncake.bench(size, procs, max(20, iters // 4))
                rows.append(row)
                print(format_row(row), flush=True)
        cuda = bench_cuda(shm)
        print("cuda:", json.dumps(cuda), flush=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        stack.close()
        if mooncake is not None:
            mooncake.stop()
    summary = summarize(rows, mooncake_reason=mooncake_peer.unavailable_reason
                        if mooncake is None else None)
    summary["cuda"] = cuda
    if huge_reason is not None:
        summary["hugetlbfs_unavailable"] = huge_reason
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return 0


# The GPU section's model shape: Llama-3-8B (32 layers, 8 KV heads of 128, bf16) in vLLM's
# flash-attention layout with 16-token blocks: a block is 64 segments (K and V per layer) of
# 32 KiB, 2 MiB in all, and a 2,048-token prefix 128 blocks (256 MiB).
GPU_LAYERS, GPU_KV_HEADS, GPU_HEAD, GPU_BLOCK_TOKENS, GPU_PREFIX_BLOCKS = 32, 8, 128, 16, 128
# (name, host hashing, threads, chunk bytes): the copy kernel computing the checksums (the
# default), one kernel and then hashing on one host thread (how it ran until 2026-11-26),
# and host threads hashing chunk by chunk behind the copy (what odd layouts get).
GPU_CONFIGS = [("gpu_hash", False, 1, 0), ("host_serial", True, 1, 0),
               ("host_chunked_t4", True, 4, 4 * MiB), ("host_chunked_t8", True, 8, 4 * MiB),
               ("host_chunked_t16", True, 16, 4 * MiB)]


def bench_cuda(shm: Path, repeat: int = 7) -> dict[str, Any]:
    """GPU path on a model's real KV layout: saving (gather_cuda) and loading (scatter_cuda) a
    2,048-token prefix of 128 scattered engine blocks, in each GPU_CONFIGS way, against what
    a connector written in torch does (per layer: index the blocks, copy to pinned host
    memory, and back) and against the DMA limit (one contiguous pinned copy of as many
    bytes). Times are medians of `repeat`, in ms per prefix."""
    if cuda_device_count() == 0:
        return {"skipped": "no CUDA device visible (or beluga_native built without nvcc)"}
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA"}
    from engine.kv_layout import block_layout

    engine_blocks = 4 * GPU_PREFIX_BLOCKS
    names = [f"model.layers.{i}.self_attn.attn" for i in range(GPU_LAYERS)]
    caches = {n: torch.randn(2, engine_blocks, GPU_BLOCK_TOKENS, GPU_KV_HEADS, GPU_HEAD,
                             dtype=torch.bfloat16, device="cuda") for n in names}
    layout = block_layout(caches, names, engine_blocks)
    ids = torch.randperm(engine_blocks)[:GPU_PREFIX_BLOCKS].tolist()
    idx = torch.tensor(ids, device="cuda")
    nbytes = GPU_PREFIX_BLOCKS * layout.block_bytes
    host = {n: torch.empty((2, GPU_PREFIX_BLOCKS, *caches[n].shape[2:]), dtype=torch.bfloat16,
                           pin_memory=True) for n in names}
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    flat_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pool = KVPool.create(shm / "cuda.pool", slot_size=layout.block_bytes,
                         slot_count=GPU_PREFIX_BLOCKS, fingerprint=hashlib.sha256(b"c").digest())
    pool.cuda_register()
    keys = [key(98, i) for i in range(GPU_PREFIX_BLOCKS)]

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def torch_save() -> None:
        for n in names:
            host[n].copy_(caches[n].index_select(1, idx), non_blocking=True)

    def torch_load() -> None:
        for n in names:
            caches[n].index_copy_(1, idx, host[n].to("cuda", non_blocking=True))

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "block_bytes": layout.block_bytes,
        "segments_per_block": len(layout.segments), "blocks": GPU_PREFIX_BLOCKS,
        "prefix_mib": nbytes / MiB, "host_cpus": os.cpu_count(),
        "dma_d2h_ms": timed(lambda: flat_host.copy_(flat_dev, non_blocking=True)),
        "dma_h2d_ms": timed(lambda: flat_dev.copy_(flat_host, non_blocking=True)),
        "torch_save_ms": timed(torch_save), "torch_load_ms": timed(torch_load),
    }
    try:
        slots = pool.prepare_store(keys)
        want = pool.gather_cuda(slots, ids, layout.segments, host_hash=True)
        assert want == [pool._p.compute_checksum(s, layout.block_bytes) for s in slots]
        hash_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            for s in slots:
                pool._p.compute_checksum(s, layout.block_bytes)
            hash_s.append(time.perf_counter() - t0)
        out["hash_one_thread_ms"] = statistics.median(hash_s) * 1e3
        for name, host, threads, chunk in GPU_CONFIGS:
            got: list[list[int]] = []
            out[f"{name}_save_ms"] = timed(lambda h=host, t=threads, c=chunk, g=got: g.append(
                pool.gather_cuda(slots, ids, layout.segments, threads=t, chunk_bytes=c,
                                 host_hash=h)))
            assert all(g == want for g in got), f"{name}: checksums differ"
        pool.complete_store(slots, [layout.block_bytes] * len(slots), checksums=want)
        with pool.pinned(keys) as pinned:
            for name, host, threads, chunk in GPU_CONFIGS:
                out[f"{name}_load_ms"] = timed(lambda h=host, t=threads, c=chunk: (
                    pool.scatter_cuda(pinned, ids, layout.segments, threads=t, chunk_bytes=c,
                                      host_hash=h)))
                assert pool.scatter_cuda(pinned, ids, layout.segments) == []
    finally:
        pool.close()
    out["by_prefix_blocks"] = _small_prefixes(caches, names, layout, shm, timed)
    for op, dma in (("save", "dma_d2h_ms"), ("load", "dma_h2d_ms")):
        for name in ["torch", *(c[0] for c in GPU_CONFIGS)]:
            out[f"{name}_{op}_gbps"] = nbytes / out[f"{name}_{op}_ms"] / 1e6
            out[f"{name}_{op}_vs_dma"] = out[dma] / out[f"{name}_{op}_ms"]
    out["disk_file_register"] = _try_register_disk_file()
    return out


def _small_prefixes(caches: dict[str, Any], names: list[str], layout: Any, shm: Path,
                    timed: Any) -> dict[str, dict[str, float]]:
    """Shorter prefixes (1..32 blocks: 16..512 tokens), where fixed costs per call show:
    the default GPU path against the torch connector, ms per save and per load."""
    import torch

    out: dict[str, dict[str, float]] = {}
    engine_blocks = next(iter(caches.values())).shape[1]
    pool = KVPool.create(shm / "small.pool", slot_size=layout.block_bytes, slot_count=64,
                         fingerprint=hashlib.sha256(b"s").digest())
    try:
        for blocks in (1, 4, 32):
            ids = torch.randperm(engine_blocks)[:blocks].tolist()
            idx = torch.tensor(ids, device="cuda")
            host = {n: torch.empty((2, blocks, *caches[n].shape[2:]), dtype=torch.bfloat16,
                                   pin_memory=True) for n in names}
            keys = [key(97 + blocks, i) for i in range(blocks)]
            slots = pool.prepare_store(keys)
            row = {"gpu_hash_save_ms": timed(lambda s=slots, i=ids: pool.gather_cuda(
                s, i, layout.segments))}
            pool.complete_store(slots, [layout.block_bytes] * blocks,
                                checksums=pool.gather_cuda(slots, ids, layout.segments))
            with pool.pinned(keys) as pinned:
                row["gpu_hash_load_ms"] = timed(lambda p=pinned, i=ids: pool.scatter_cuda(
                    p, i, layout.segments))
            row["torch_save_ms"] = timed(lambda h=host, x=idx: [
                h[n].copy_(caches[n].index_select(1, x), non_blocking=True) for n in names])
            row["torch_load_ms"] = timed(lambda h=host, x=idx: [
                caches[n].index_copy_(1, x, h[n].to("cuda", non_blocking=True))
                for n in names])
            out[str(blocks)] = row
            for k in keys:
                pool.remove(k)
    finally:
        pool.close()
    return out


def _try_register_disk_file() -> str:
    """Whether this kernel lets the GPU pin a pool kept in a file on a disk filesystem."""
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        pool = KVPool.create(Path(d) / "disk.pool", slot_size=MiB, slot_count=4,
                             fingerprint=hashlib.sha256(b"d").digest())
        try:
            pool.cuda_register()
            return "ok"
        except PoolError as exc:
            return str(exc)
        finally:
            pool.close()


def format_row(row: dict[str, Any]) -> str:
    parts = [f"{row['block_bytes'] // KiB:>5} KiB x{row['procs']}",
             f"memcpy w {row['memcpy_write']['gbps']:6.2f} r {row['memcpy_read']['gbps']:6.2f}",
             f"shm w {row['memcpy_shm_write']['gbps']:6.2f} "
             f"r {row['memcpy_shm_read']['gbps']:6.2f}"]
    for config, _, _ in CONFIGS + HUGE_CONFIGS:
        if config not in row:
            continue
        b = row[config]
        parts.append(f"{config[7:]}: put {b['put']['gbps']:6.2f} get {b['get']['gbps']:6.2f}")
    if "mooncake" in row:
        m = row["mooncake"]
        parts.append(f"mooncake: put {m['put']['gbps']:6.2f} get {m['get']['gbps']:6.2f}")
    return " | ".join(parts) + "  GB/s"


def summarize(rows: list[dict[str, Any]], mooncake_reason: str | None) -> dict[str, Any]:
    one = next(r for r in rows if r["block_bytes"] == MiB and r["procs"] == 1)
    out: dict[str, Any] = {
        "memcpy_gbps": one["memcpy_write"]["gbps"],
        "memcpy_read_gbps": one["memcpy_read"]["gbps"],
        "memcpy_shm_gbps": one["memcpy_shm_write"]["gbps"],
        "memcpy_shm_read_gbps": one["memcpy_shm_read"]["gbps"],
        "beluga_get_gbps": one["beluga_none"]["get"]["gbps"],
        "beluga_put_gbps": one["beluga_none"]["put"]["gbps"],
        "beluga_flush_get_gbps": one["beluga_flush"]["get"]["gbps"],
        "beluga_flush_put_gbps": one["beluga_flush"]["put"]["gbps"],
        "beluga_get_p50_us": one["beluga_none"]["get"]["p50_us"],
        "beluga_get_p99_us": one["beluga_none"]["get"]["p99_us"],
        "beluga_put_p50_us": one["beluga_none"]["put"]["p50_us"],
        "beluga_put_p99_us": one["beluga_none"]["put"]["p99_us"],
    }
    if "mooncake" in one:
        out["mooncake_get_gbps"] = one["mooncake"]["get"]["gbps"]
        out["mooncake_put_gbps"] = one["mooncake"]["put"]["gbps"]
    else:
        out["mooncake_get_gbps"] = out["mooncake_put_gbps"] = None
        out["mooncake_unavailable"] = mooncake_reason
    big = [r for r in rows if r["block_bytes"] >= 256 * KiB]
    ratios = [r["beluga_none"][op]["gbps"] / r[f"memcpy_{d}"]["gbps"]
              for r in big for op, d in (("put", "write"), ("get", "read"))]
    out["min_ratio_to_memcpy_from_256KiB"] = min(ratios)
    out["median_ratio_to_memcpy_from_256KiB"] = statistics.median(ratios)
    batched = [r["beluga_batch"][op]["gbps"] / r[f"memcpy_{d}"]["gbps"]
               for r in big for op, d in (("put", "write"), ("get", "read"))]
    shm = [r["beluga_batch"][op]["gbps"] / r[f"memcpy_shm_{d}"]["gbps"]
           for r in big for op, d in (("put", "write"), ("get", "read"))]
    out["batched_median_ratio_to_shm_memcpy_from_256KiB"] = statistics.median(shm)
    out["batched_min_ratio_to_shm_memcpy_from_256KiB"] = min(shm)
    out["batched_min_ratio_to_memcpy_from_256KiB"] = min(batched)
    out["batched_median_ratio_to_memcpy_from_256KiB"] = statistics.median(batched)
    if "beluga_huge" in one:
        huge = [r[c][op]["gbps"] / r[f"memcpy_{d}"]["gbps"]
                for r in big for c in ("beluga_huge", "beluga_huge_batch")
                for op, d in (("put", "write"), ("get", "read"))]
        out["huge_min_ratio_to_memcpy_from_256KiB"] = min(huge)
        out["huge_median_ratio_to_memcpy_from_256KiB"] = statistics.median(huge)
        for c in ("beluga_huge", "beluga_huge_batch"):
            for op in ("get", "put"):
                out[f"{c}_{op}_gbps"] = one[c][op]["gbps"]
    out["beluga_batch_get_gbps"] = one["beluga_batch"]["get"]["gbps"]
    out["beluga_batch_put_gbps"] = one["beluga_batch"]["put"]["gbps"]
    if out["mooncake_get_gbps"]:
        out["get_vs_mooncake"] = out["beluga_get_gbps"] / out["mooncake_get_gbps"]
        out["put_vs_mooncake"] = out["beluga_put_gbps"] / out["mooncake_put_gbps"]
    return out


if __name__ == "__main__":
    sys.exit(main())
