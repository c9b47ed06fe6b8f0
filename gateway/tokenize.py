"""Token ids of a request, computed exactly as vLLM will compute them, for block keys.

Chat: the model's chat template applied to `messages` (with `tools`, and vLLM's defaults
`add_generation_prompt=True`, `continue_final_message=False`, overridable per request the
way vLLM's own extra parameters are), then tokenized without extra special tokens.
Completions: a string prompt tokenized with the tokenizer's special tokens (vLLM's default
`add_special_tokens=True`); token-id prompts as given; for a batch, the first prompt.

Tokenizers are loaded once per model folder. Anything the template or tokenizer rejects
gives None: the request is still served (vLLM reports its own error), only routed without
prefix knowledge.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(self, model_dirs: dict[str, Path]) -> None:
        self._dirs = dict(model_dirs)
        self._loaded: dict[str, Any] = {}

    def knows(self, model: str) -> bool:
        return model in self._dirs

    def _tokenizer(self, model: str) -> Any | None:
        tok = self._loaded.get(model)
        if tok is None and model in self._dirs:
            from transformers import AutoTokenizer  # heavy: only when routing needs it
            try:
                tok = AutoTokenizer.from_pretrained(self._dirs[model])
            except (OSError, ValueError) as exc:
                logger.warning("cannot load the tokenizer of %s from %s: %s", model,
                               self._dirs[model], exc)
                self._dirs.pop(model)
                return None
            self._loaded[model] = tok
        return tok

    def tokens(self, model: str, endpoint: str, payload: dict[str, Any]) -> list[int] | None:
        tok = self._tokenizer(model)
        if tok is None:
            return None
        try:
            if endpoint == "chat":
                ids = tok.apply_chat_template(
                    payload["messages"], tools=payload.get("tools"), tokenize=True,
                    add_generation_prompt=payload.get("add_generation_prompt", True),
                    continue_final_message=payload.get("continue_final_message", False),
                    **(payload.get("chat_template_kwargs") or {}))
                if not isinstance(ids, list):  # a BatchEncoding in newer transformers
                    ids = ids["input_ids"]
                return [int(t) for t in ids]
            prompt = payload["prompt"]
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
                prompt = prompt[0]  # a batch: route on its first prompt
            if isinstance(prompt, list):
                return [int(t) for t in prompt]
            add = payload.get("add_special_tokens", True)
            return [int(t) for t in tok(prompt, add_special_tokens=add)["input_ids"]]
        except Exception as exc:  # noqa: BLE001 - templates raise anything; never fail routing
            logger.debug("cannot tokenize a %s request for %s: %s", endpoint, model, exc)
            return None
