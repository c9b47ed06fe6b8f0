"""Where one vLLM KV block lives in the engine's paged cache, as copy segments for the pool.

A pool slot holds one engine block for every layer, back to back, in the order of the KV
cache group's layer names (the same order in every worker of a model). Each layer tensor
contributes one segment per index of the dimensions in front of its block dimension:
the CPU backend's [blocks, heads, block_size, 2 x head_size] gives one segment per layer,
flash-attention's [2, blocks, block_size, heads, head_size] gives two (K and V).
This module needs only torch, so it is unit-tested without an engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Segment = tuple[int, int, int]  # (base address, bytes between blocks, bytes per block)


class LayoutError(ValueError):
    """The KV cache tensors do not have a layout the pool can copy block by block."""


@dataclass(frozen=True)
class BlockLayout:
    segments: tuple[Segment, ...]
    block_bytes: int  # bytes of one engine block over all layers: the pool's slot size
    device: torch.device


def block_layout(kv_caches: Mapping[str, torch.Tensor], layer_names: Sequence[str],
                 num_blocks: int) -> BlockLayout:
    """Segments of one block of `num_blocks` over the named layers, in their order."""
    if num_blocks <= 0:
        raise LayoutError(f"num_blocks must be positive, got {num_blocks}")
    missing = [n for n in layer_names if n not in kv_caches]
    if missing:
        raise LayoutError(f"no KV cache tensor for layers {missing[:3]}")
    segments: list[Segment] = []
    seen: set[int] = set()
    devices = set()
    for name in layer_names:
        t = kv_caches[name]
        if t.data_ptr() in seen:  # layers sharing one cache (cross-layer KV sharing)
            continue
        seen.add(t.data_ptr())
        devices.add(t.device)
        segments += _layer_segments(name, t, num_blocks)
    if len(devices) != 1:
        raise LayoutError(f"KV cache tensors on several devices: {sorted(map(str, devices))}")
    return BlockLayout(tuple(segments), sum(s[2] for s in segments), devices.pop())


def _layer_segments(name: str, t: torch.Tensor, num_blocks: int) -> list[Segment]:
    # The block dimension: the first whose size is a whole multiple of num_blocks (kernel
    # blocks may be smaller than the scheduler's: then one block is `ratio` kernel blocks).
    dim = next((d for d, size in enumerate(t.shape)
                if size >= num_blocks and size % num_blocks == 0), None)
    if dim is None:
        raise LayoutError(f"{name}: no dimension of {tuple(t.shape)} counts {num_blocks} blocks")
    ratio = t.shape[dim] // num_blocks
    elem = t.element_size()
    inner = t.select(dim, 0)
    for _ in range(dim):
        inner = inner.select(0, 0)
    if not inner.is_contiguous():
        raise LayoutError(f"{name}: a block's bytes are not contiguous (strides {t.stride()})")
    kernel_bytes = inner.numel() * elem
    stride = t.stride(dim) * elem
    if ratio > 1 and stride != kernel_bytes:
        raise LayoutError(f"{name}: kernel blocks of one block are not adjacent")
    out = []
    for index in itertools.product(*(range(n) for n in t.shape[:dim])):
        offset = sum(i * s for i, s in zip(index, t.stride()[:dim], strict=True))
        base = t.data_ptr() + offset * elem
        out.append((base, stride * ratio, kernel_bytes * ratio))
    return out
