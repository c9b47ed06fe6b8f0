"""The model identity behind every block key, from vLLM's resolved configuration: one
function for the connector (the pool's fingerprint) and the local-cache hints (the
fingerprint gateways key prompts with), so the two can never disagree."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpool import ModelIdentity

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def model_identity(vllm_config: VllmConfig, tp_rank: int = 0) -> ModelIdentity:
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    name = model.served_model_name
    if isinstance(name, list):
        name = name[0]
    return ModelIdentity(
        name=str(name), revision=str(model.revision or ""),
        dtype=f"{model.dtype}/{cache.cache_dtype}",
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel), head_size=model.get_head_size(),
        block_tokens=cache.block_size, tp_rank=tp_rank,
        tp_size=parallel.tensor_parallel_size)
