"""A real LoRA adapter for the default model, made here (no hub): PEFT's on-disk format
(adapter_config.json + adapter_model.safetensors with PEFT's tensor names), rank 8 on every
layer's q_proj and v_proj, seeded random weights large enough to change greedy answers.
vLLM loads it with --enable-lora --lora-modules NAME=FOLDER."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "beluga-test-lora"
RANK = 8


def make_adapter(folder: Path, model: Path, seed: int = 18) -> Path:
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model / "config.json").read_text())
    hidden = cfg["hidden_size"]
    head = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    outs = {"q_proj": cfg["num_attention_heads"] * head,
            "v_proj": cfg["num_key_value_heads"] * head}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for proj, out in outs.items():
            base = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = (
                torch.randn(RANK, hidden, generator=gen) / hidden ** 0.5).contiguous()
            tensors[f"{base}.lora_B.weight"] = (
                torch.randn(out, RANK, generator=gen) * 0.08).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model),
        "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(outs), "fan_in_fan_out": False, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "inference_mode": True}, indent=2))
    return folder
