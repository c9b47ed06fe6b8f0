"""Token ids of a request, computed exactly as vLLM will compute them, for block keys.

Chat: the model's chat template applied to `messages` (with `tools`, and vLLM's defaults
`add_generation_prompt=True`, `continue_final_message=False`, overridable per request the
way vLLM's own extra parameters are), then tokenized without extra special tokens.
Completions: a string prompt tokenized with the tokenizer's special tokens (vLLM's default
`add_special_tokens=True`); token-id prompts as given; for a batch, the first prompt.

Tokenizers are loaded once per model folder. Anything the template or tokenizer rejects
gives None: the request is still served (vLLM reports its own error), only routed without
prefix knowledge.

Chat prompts are tokenized per segment between added (special) tokens, with a bounded cache
of segments: the tokenizer cuts its input at added tokens before anything else runs, so the
pieces tokenize exactly as the whole does (checked once per tokenizer on a sample, and
against vLLM's /tokenize in the e2e suite), and a repeated system prompt or an earlier turn
costs a dictionary lookup instead of a second tokenization.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


SAMPLE = [{"role": "system", "content": "You are  a helper.\n"},
          {"role": "user", "content": " Hi<|x|> there ü\t\n\n"},
          {"role": "assistant", "content": "Hello!  "}, {"role": "user", "content": "ok"}]


class SegmentCache:
    """Token ids of text pieces between added tokens, LRU-bounded."""

    def __init__(self, tok: Any, entries: int = 4096, max_chars: int = 65536) -> None:
        self._tok = tok
        added = sorted(tok.added_tokens_encoder, key=len, reverse=True)
        self._ids = dict(tok.added_tokens_encoder)
        self._split = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._entries, self._max_chars = entries, max_chars
        exact = all(not getattr(t, "lstrip", False) and not getattr(t, "rstrip", False)
                    for t in tok.added_tokens_decoder.values())
        self.enabled = exact and self._split is not None

    def encode(self, text: str) -> list[int]:
        assert self._split is not None
        out: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._ids.get(piece)
            if special is not None:
                out.append(special)
                continue
            ids = self._cache.get(piece)
            if ids is None:
                ids = self._tok(piece, add_special_tokens=False)["input_ids"]
                if len(piece) <= self._max_chars:
                    self._cache[piece] = ids
                    if len(self._cache) > self._entries:
                        self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(piece)
            out.extend(ids)
        return out


class PromptTokenizer:
    def __init__(self, model_dirs: dict[str, Path]) -> None:
        self._dirs = dict(model_dirs)
        self._loaded: dict[str, Any] = {}
        self._segments: dict[str, SegmentCache] = {}

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
            cache = SegmentCache(tok)
            if cache.enabled:
                text = tok.apply_chat_template(SAMPLE, tokenize=False,
                                               add_generation_prompt=True)
                cache.enabled = isinstance(text, str) and cache.encode(text) == tok(
                    text, add_special_tokens=False)["input_ids"]
            self._segments[model] = cache
        return tok

    def tokens(self, model: str, endpoint: str, payload: dict[str, Any]) -> list[int] | None:
        tok = self._tokenizer(model)
        if tok is None:
            return None
        try:
            if endpoint == "chat":
                text = tok.apply_chat_template(
                    payload["messages"], tools=payload.get("tools"), tokenize=False,
                    add_generation_prompt=payload.get("add_generation_prompt", True),
                    continue_final_message=payload.get("continue_final_message", False),
                    **(payload.get("chat_template_kwargs") or {}))
                if not isinstance(text, str):
                    return None
                cache = self._segments.get(model)
                if cache is not None and cache.enabled:
                    return cache.encode(text)
                return [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
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
