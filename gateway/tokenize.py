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

Plain-ASCII text of a byte-level BPE tokenizer is split into its pre-tokens (a word with its
leading space, a number, a run of punctuation or of spaces) with the tokenizer's own split
pattern, and each pre-token's ids come from a bounded dictionary, filled by the tokenizer
itself: BPE never merges across pre-tokens, so the ids are the same, at a quarter of the
Rust tokenizer's per-call cost (its offsets and encoding objects, which routing never reads;
bench/README.md). Also self-checked per tokenizer on a sample of hard cases.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


SAMPLE = [{"role": "system", "content": "You are  a helper.\n"},
          {"role": "user", "content": " Hi<|x|> there ü\t\n\n"},
          {"role": "assistant", "content": "Hello!  "}, {"role": "user", "content": "ok"}]


# A long piece between added tokens is tokenized in chunks of about this many characters,
# cut just before a space that follows a non-space and precedes one: a boundary of the
# tokenizer's pre-tokenization, so the chunks' ids are the whole piece's ids (checked per
# tokenizer on SAMPLE_LONG). Routing needs only the leading blocks anyone holds, so most of
# a new long prompt is never tokenized at all.
CHUNK_CHARS = 1024
FIRST_CHUNK_CHARS = 256  # a piece's first chunk (~60 tokens: one 32-token block); the next
                         # ones double up to CHUNK_CHARS. A new prompt nobody holds is read
                         # only as far as its first block key, so most of it never is.
SAMPLE_LONG = ("The  quick brown fox, 12345 jumps over 3.14 lazy dogs; don't stop!\n\n"
               "ü ✓ 東京  tab\there  ") * 40


# GPT-2's pre-tokenization (a ByteLevel pre-tokenizer with use_regex), as the tokenizers
# library writes it.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same on the plain ASCII the word cache takes, for Python's own `re` (twice as fast as
# `regex` here): letters are A-Z and a-z, numbers 0-9.
GPT2_SPLIT_ASCII = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+"""
                    r"""|\s+(?!\S)|\s+""")
# Text the word cache takes: printable ASCII, tab, newline, carriage return. On these the
# pattern's classes (\p{L}, \p{N}, \s) mean the same in Python's `regex` as in the Rust
# tokenizer's Oniguruma; anything else goes to the tokenizer whole.
NOT_PLAIN = re.compile(r"[^\t\n\r\x20-\x7e]")
SAMPLE_ASCII = ("The  quick brown fox, 12345 jumps over 3.14 lazy dogs; don't STOP!!\n\n"
                "  I'M sure they'll've   it's \t\ttabs\r\n(x) [y]{z} a--b__c 1,000,000 "
                "e.g. www.x.org/a?b=c&d=%20 #hash @at $5 ~`^|\\ 'quoted' \"dq\"   \n ") * 20


MAX_WORD_CHARS = 64  # longer pre-tokens are tokenized every time, not kept


class WordIds:
    """Token ids of plain-ASCII text, pre-token by pre-token, from a bounded dictionary that
    the tokenizer fills (the misses of one text in one batch call)."""

    def __init__(self, encode_batch: Any, split: Any, entries: int = 65536) -> None:
        self._encode_batch = encode_batch
        self._findall = split.findall
        self._ids: dict[str, list[int]] = {}
        self._entries = entries

    @classmethod
    def of(cls, tok: Any) -> WordIds | None:
        """For a byte-level BPE tokenizer without a normalizer whose split pattern is known
        (GPT-2's, or a Split regex before a ByteLevel without one); None otherwise."""
        backend = getattr(tok, "backend_tokenizer", None)
        encode_batch = getattr(backend, "encode_batch_fast", None)
        if backend is None or encode_batch is None:
            return None
        try:
            pattern = _split_pattern(json.loads(backend.to_str()))
        except (ValueError, AttributeError):
            return None
        if pattern is None:
            return None
        if pattern == GPT2_SPLIT:
            return cls(encode_batch, re.compile(GPT2_SPLIT_ASCII))
        try:
            import regex  # \p{...} classes; a dependency of transformers
        except ImportError:
            return None
        try:
            return cls(encode_batch, regex.compile(pattern))
        except regex.error:
            return None

    def encode(self, text: str) -> list[int] | None:
        """The ids of `text`, or None when it is not plain ASCII."""
        if NOT_PLAIN.search(text):
            return None
        words = self._findall(text)
        get = self._ids.get
        missing = [w for w in words if get(w) is None]
        fresh: dict[str, list[int]] = {}
        if missing:
            if len(self._ids) + len(missing) > self._entries:
                self._ids.clear()
                missing = words
            new = list(dict.fromkeys(missing))
            for w, enc in zip(new, self._encode_batch(new, add_special_tokens=False),
                              strict=True):
                fresh[w] = enc.ids
                if len(w) <= MAX_WORD_CHARS:  # bounded by bytes: long "words" not kept
                    self._ids[w] = enc.ids
        out: list[int] = []
        for w in words:
            ids = get(w)
            out += ids if ids is not None else fresh[w]
        return out


def _split_pattern(spec: dict[str, Any]) -> str | None:
    """The regex a tokenizer (its tokenizer.json) splits text with before byte-level BPE."""
    if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
        return None
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            return GPT2_SPLIT
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if (split.get("type") == "Split" and isinstance(regex, str)
            and split.get("behavior") == "Isolated" and not split.get("invert", False)
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", False)):
        return regex
    return None


class _Content(str):
    """A message's content while a chat template's skeleton is learnt: a sentinel string
    that notes any use of it other than being output or concatenated (a comparison, a
    length, a search, a strip, a hash: anything by which the template could treat two
    contents differently)."""

    touched = False


def _noting(name: str) -> Any:
    method = getattr(str, name)

    def noted(self: _Content, *args: Any, **kwargs: Any) -> Any:
        self.touched = True
        return method(self, *args, **kwargs)

    noted.__name__ = name
    return noted


for _name in dir(str):
    if _name not in ("__str__", "__add__", "__new__", "__init__", "__getattribute__",
                     "__setattr__", "__delattr__", "__class__", "__init_subclass__",
                     "__subclasshook__", "__getnewargs__", "__reduce__", "__reduce_ex__",
                     "__sizeof__", "__dir__", "__doc__") and callable(getattr(str, _name)):
        setattr(_Content, _name, _noting(_name))


MAX_SHAPE = 256  # chats with more messages are rendered by the template (shapes not kept)


class ChatSkeletons:
    """A chat template's text for plain messages (a role and a string content each) without
    running the template: per shape (the roles in order, `add_generation_prompt`) the text
    between the contents, learnt once by rendering sentinel contents.

    Only for templates that treat a content as opaque text, output once where it stands:
    the sentinels note any other use (bound to differ between contents: a strip, a search,
    a comparison) and are then found exactly once each, in order, or the shape falls back
    to the template. Templates that read the clock (`strftime_now`) always do. The first
    use of each shape, and every `recheck_every`-th render after, is also rendered by the
    template and compared; one difference turns the fast path off for good."""

    def __init__(self, render: Any, template: str | None, entries: int = 256,
                 recheck_every: int = 256) -> None:
        self._render = render  # (messages, add_generation_prompt) -> str
        self._shapes: OrderedDict[tuple[Any, ...], list[str] | None] = OrderedDict()
        self._entries, self._recheck_every = entries, recheck_every
        self._renders = 0
        self.enabled = template is not None and "strftime_now" not in template

    def render(self, messages: Any, add_generation_prompt: bool) -> str | None:
        """The template's text for `messages`, or None when this path does not apply."""
        if not self.enabled or type(messages) is not list or len(messages) > MAX_SHAPE:
            return None
        shape: list[Any] = [add_generation_prompt]
        contents: list[str] = []
        for m in messages:
            if type(m) is not dict or len(m) != 2:
                return None
            role, content = m.get("role"), m.get("content")
            if type(role) is not str or type(content) is not str:
                return None
            shape.append(role)
            contents.append(content)
        key = tuple(shape)
        if key in self._shapes:
            parts = self._shapes[key]
        else:
            parts = self._learn(key, len(contents), add_generation_prompt)
            self._renders = 0  # so this first use is compared below
        if parts is None:
            return None
        out = [parts[0]]
        for content, part in zip(contents, parts[1:], strict=True):
            out.append(content)
            out.append(part)
        text = "".join(out)
        if self._renders % self._recheck_every == 0:
            want = self._render(messages, add_generation_prompt)
            if want != text:
                logger.warning("the chat template's text differs from its learnt skeleton; "
                               "rendering every prompt with the template from now on")
                self.enabled = False
                return want if isinstance(want, str) else None
        self._renders += 1
        return text

    def _learn(self, key: tuple[Any, ...], n: int,
               add_generation_prompt: bool) -> list[str] | None:
        # Control characters, markup and quotes, spaces at both ends: an escape, an
        # encoding or a trim changes it (and is then not found), even one the noting misses.
        sentinels = [_Content(f" \x00\x01<beluga-{i} & 'Aa\">\x02\x00 ") for i in range(n)]
        try:
            text = self._render([{"role": r, "content": c} for r, c in zip(key[1:], sentinels,
                                                                            strict=True)],
                                add_generation_prompt)
        except Exception:  # noqa: BLE001 - a template may refuse a shape: no fast path
            text = None
        parts: list[str] | None = None
        if isinstance(text, str) and not any(c.touched for c in sentinels):
            rest, parts = text, []
            for c in sentinels:
                before, found, rest = rest.partition(str(c))
                if not found or str(c) in rest:
                    parts = None
                    break
                parts.append(before)
            if parts is not None:
                parts.append(rest)
        self._shapes[key] = parts
        if len(self._shapes) > self._entries:
            self._shapes.popitem(last=False)
        return parts


class SegmentCache:
    """Token ids of text pieces between added tokens, LRU-bounded, produced lazily."""

    def __init__(self, tok: Any, entries: int = 4096, max_chars: int = 65536,
                 total_chars: int = 4 * 1024 * 1024) -> None:
        self._tok = tok
        # The Rust tokenizer itself, without offsets: a third faster than tok(...) (whose
        # Python wrapping adds nothing these ids need). Checked equal by PromptTokenizer.
        backend = getattr(tok, "backend_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None)
        added = sorted(tok.added_tokens_encoder, key=len, reverse=True)
        self._ids = dict(tok.added_tokens_encoder)
        self._split = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._entries, self._max_chars = entries, max_chars
        # Bounded by size, not only by entries: the pieces' text plus their ids (~40 bytes
        # per id as Python ints) stays under total_chars * ~11 bytes.
        self._total_chars, self._chars = total_chars, 0
        self.chunk_chars = CHUNK_CHARS
        self.first_chunk_chars = FIRST_CHUNK_CHARS
        exact = all(not getattr(t, "lstrip", False) and not getattr(t, "rstrip", False)
                    for t in tok.added_tokens_decoder.values())
        self.enabled = exact and self._split is not None
        self.words: WordIds | None = None  # set once checked (PromptTokenizer)

    def _encode(self, text: str) -> list[int]:
        if self.words is not None:
            plain = self.words.encode(text)
            if plain is not None:
                return plain
        if self._fast is not None:
            ids: list[int] = self._fast([text], add_special_tokens=False)[0].ids
            return ids
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def _chunks(self, piece: str) -> Iterator[tuple[list[int], int]]:
        """(ids, characters) of `piece` in chunks cut at pre-tokenization boundaries."""
        start = 0
        size = min(self.first_chunk_chars, self.chunk_chars)
        while len(piece) - start > size:
            cut = piece.find(" ", start + size)
            while 0 < cut < len(piece) - 1 and (piece[cut - 1].isspace()
                                                or piece[cut + 1].isspace()):
                cut = piece.find(" ", cut + 1)
            if cut <= 0 or cut >= len(piece) - 1:
                break
            yield self._encode(piece[start:cut]), cut - start
            start = cut
            size = min(2 * size, self.chunk_chars)
        yield self._encode(piece[start:]), len(piece) - start

    def pieces(self, text: str) -> Iterator[tuple[list[int], int, str | None]]:
        """(ids, characters, piece) of `text` in order, tokenizing only as far as it is
        read; `piece` is the text of `ids` when they are a whole piece's (a special token, or
        a piece from the cache), None for a part of one."""
        assert self._split is not None
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._ids.get(piece)
            if special is not None:
                yield [special], len(piece), piece
                continue
            ids = self._cache.get(piece)
            if ids is not None:
                self._cache.move_to_end(piece)
                yield ids, len(piece), piece
                continue
            whole: list[int] = []
            for chunk, chars in self._chunks(piece):
                whole.extend(chunk)
                yield chunk, chars, None
            if len(piece) <= self._max_chars and piece not in self._cache:
                self._cache[piece] = whole  # read to its end: remember it
                self._chars += len(piece)
                while self._cache and (len(self._cache) > self._entries
                                       or self._chars > self._total_chars):
                    old, _ = self._cache.popitem(last=False)
                    self._chars -= len(old)

    def encode(self, text: str) -> list[int]:
        return [t for ids, _, _ in self.pieces(text) for t in ids]


def text_bytes(text: str) -> int:
    """About what a prompt's text and its pieces take in memory (Python keeps a string in
    1, 2 or 4 bytes a character, by its widest)."""
    return 2 * sys.getsizeof(text)


class Prompt:
    """A prompt's token ids, tokenized on demand and not kept: `chunks()` yields them in
    order (reading the text only as far as the caller goes), `estimate_total()` extrapolates
    the length from what was read so far."""

    def __init__(self, pieces: Iterator[tuple[list[int], int, str | None]],
                 total_chars: int, truncated: bool = False) -> None:
        self._pieces: Iterator[tuple[list[int], int, str | None]] | None = pieces
        self._total_chars = total_chars
        self.truncated = truncated  # only the prompt's start is read (routing_max_chars)
        self.held_bytes = total_chars  # about what this object keeps alive (see `of_ids`)
        self._chars = 0
        self._tokens = 0
        self._last = (0, 0)  # tokens and characters of the last chunk read

    @classmethod
    def of(cls, ids: list[int]) -> Prompt:
        return cls(iter([(ids, 0, None)]), 0)

    @property
    def complete(self) -> bool:
        return self._pieces is None

    @property
    def tokens_read(self) -> int:
        return self._tokens

    def chunks(self) -> Iterator[list[int]]:
        for ids, _ in self.parts():
            yield ids

    def parts(self) -> Iterator[tuple[list[int], str | None]]:
        """(ids, piece) in order: `piece` is the text of `ids` when they are a whole piece
        between added tokens (see SegmentCache.pieces), None for a part of one."""
        while self._pieces is not None:
            try:
                ids, chars, piece = next(self._pieces)
            except StopIteration:
                self._pieces = None
                return
            self._tokens += len(ids)
            self._chars += chars
            self._last = (len(ids), chars)
            yield ids, piece

    def all(self) -> list[int]:
        return [t for ids in self.chunks() for t in ids]

    def estimate_total(self) -> int:
        if self._pieces is None or self._chars == 0:
            return self._tokens
        rest = max(0, self._total_chars - self._chars)
        # The unread text most likely goes on like the last chunk (the template and the
        # system prompt read first may tokenize quite differently from it).
        tokens, chars = self._last if self._last[1] >= 64 else (self._tokens, self._chars)
        return self._tokens + round(rest * tokens / chars)


# Arguments of apply_chat_template itself: never taken from a request's chat_template_kwargs
# (vLLM does not pass them on either; here they would change what is rendered or returned).
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"})


class PromptTokenizer:
    def __init__(self, model_dirs: dict[str, str | Path]) -> None:
        """`model_dirs`: served model name -> its tokenizer's folder or Hub id."""
        self._dirs = dict(model_dirs)
        self._loaded: dict[str, Any] = {}
        self._segments: dict[str, SegmentCache] = {}
        self._skeletons: dict[str, ChatSkeletons] = {}
        # The special tokens the tokenizer puts before a completions prompt (e.g. a BOS),
        # when that is all it adds (checked per tokenizer): such prompts are then tokenized
        # in chunks, lazily, like chat prompts.
        self._prefix_ids: dict[str, list[int]] = {}

    def knows(self, model: str) -> bool:
        return model in self._dirs

    def load_all(self) -> None:
        """Load (and self-check) every model's tokenizer now rather than on first use."""
        for model in list(self._dirs):
            self._tokenizer(model)

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
            cache = SegmentCache(tok)
            if cache.enabled:
                text = tok.apply_chat_template(SAMPLE, tokenize=False,
                                               add_generation_prompt=True)
                cache.enabled = isinstance(text, str) and cache.encode(text) == tok(
                    text, add_special_tokens=False)["input_ids"]
            if cache.enabled:
                whole = tok(SAMPLE_LONG, add_special_tokens=False)["input_ids"]
                # many cuts, on the tokenizer's own hard cases
                cache.chunk_chars = cache.first_chunk_chars = 16
                chunked = [t for ids, _ in cache._chunks(SAMPLE_LONG) for t in ids]
                if chunked == whole:
                    cache.chunk_chars, cache.first_chunk_chars = CHUNK_CHARS, FIRST_CHUNK_CHARS
                else:
                    cache.chunk_chars = cache.first_chunk_chars = sys.maxsize
                    logger.info("%s: chunked tokenizing differs from whole; tokenizing "
                                "pieces whole", model)
                words = WordIds.of(tok)
                if words is not None:
                    want = tok(SAMPLE_ASCII, add_special_tokens=False)["input_ids"]
                    if words.encode(SAMPLE_ASCII) == want == words.encode(SAMPLE_ASCII):
                        cache.words = words
                    else:
                        logger.info("%s: its split pattern does not reproduce the tokenizer; "
                                    "no word cache", model)
            self._segments[model] = cache
            if cache.enabled:
                start = [int(t) for t in tok("", add_special_tokens=True)["input_ids"]]
                bare = tok(SAMPLE_LONG, add_special_tokens=False)["input_ids"]
                if tok(SAMPLE_LONG, add_special_tokens=True)["input_ids"] == start + bare:
                    self._prefix_ids[model] = start
            template = getattr(tok, "chat_template", None)
            self._skeletons[model] = ChatSkeletons(
                lambda messages, generation: tok.apply_chat_template(
                    messages, tools=None, tokenize=False, add_generation_prompt=generation,
                    continue_final_message=False),
                template if isinstance(template, str) else None)
            self._loaded[model] = tok  # last: `loaded` means ready to use
        return tok

    def loaded(self, model: str) -> bool:
        """Whether the model's tokenizer is loaded and checked (see `load_all`)."""
        return model in self._loaded

    def vocab_size(self, model: str) -> int | None:
        """How many token ids the model's tokenizer knows, once it is loaded (else None)."""
        tok = self._loaded.get(model)
        return len(tok) if tok is not None else None

    def tokens(self, model: str, endpoint: str, payload: dict[str, Any]) -> list[int] | None:
        """All token ids of the request's prompt (None: not computable here)."""
        prompt = self.prompt(model, endpoint, payload)
        if prompt is None:
            return None
        try:
            return prompt.all()
        except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate the tokenizer refuses
            logger.debug("cannot tokenize a %s request for %s: %s", endpoint, model, exc)
            return None

    def prompt(self, model: str, endpoint: str, payload: dict[str, Any],
               max_chars: int | None = None, trust_templates: bool = False) -> Prompt | None:
        """The request's prompt, tokenized as far as it is read (chat prompts; others are
        tokenized at once), and only its first `max_chars` characters (token ids: that
        many ids) when given: routing reads no further (the tokens at the cut may differ
        from the whole prompt's; routing keys are hints). A template sent with the request
        is rendered only when `trust_templates`. None: not computable here."""
        tok = self._tokenizer(model)
        if tok is None:
            return None
        cap = max_chars if max_chars is not None else sys.maxsize
        try:
            if endpoint == "chat":
                generation = payload.get("add_generation_prompt", True)
                kwargs = payload.get("chat_template_kwargs") or {}
                if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                    return None
                kwargs = {k: v for k, v in kwargs.items() if k not in TEMPLATE_ARGUMENTS}
                template = payload.get("chat_template")
                if not trust_templates and (template is not None or "chat_template" in kwargs):
                    return None
                if template is not None:
                    kwargs["chat_template"] = template
                text = None
                skeletons = self._skeletons.get(model)
                if (skeletons is not None and type(generation) is bool
                        and payload.get("tools") is None
                        and not payload.get("continue_final_message", False)
                        and not kwargs):
                    text = skeletons.render(payload["messages"], generation)
                if text is None:
                    text = tok.apply_chat_template(
                        payload["messages"], tools=payload.get("tools"), tokenize=False,
                        add_generation_prompt=generation,
                        continue_final_message=payload.get("continue_final_message", False),
                        **kwargs)
                if not isinstance(text, str):
                    return None
                total = len(text)
                text = text[:cap]
                cache = self._segments.get(model)
                if cache is not None and cache.enabled:
                    out = Prompt(cache.pieces(text), total, truncated=total > cap)
                    out.held_bytes = text_bytes(text)
                    return out
                ids = [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
                out = Prompt(iter([(ids, len(text), None)]), total, truncated=total > cap)
                out.held_bytes = 40 * len(ids)
                return out
            prompt = payload["prompt"]
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
                prompt = prompt[0]  # a batch: route on its first prompt
            if isinstance(prompt, list):
                ids = [int(t) for t in prompt[:cap]]
                out = Prompt(iter([(ids, len(ids), None)]), len(prompt),
                             truncated=len(prompt) > cap)
                out.held_bytes = 40 * len(ids)  # Python ints in a list
                return out
            if not isinstance(prompt, str):
                return None
            add = payload.get("add_special_tokens", True) is not False
            text = prompt[:cap]
            start = self._prefix_ids.get(model)
            cache = self._segments.get(model)
            if start is not None and cache is not None and cache.enabled:
                pieces = cache.pieces(text)
                if add and start:
                    pieces = itertools.chain([(list(start), 0, None)], pieces)
                out = Prompt(pieces, len(prompt), truncated=len(prompt) > cap)
                out.held_bytes = text_bytes(text)
                return out
            ids = [int(t) for t in tok(text, add_special_tokens=add)["input_ids"]]
            out = Prompt(iter([(ids, min(cap, len(prompt)), None)]), len(prompt),
                         truncated=len(prompt) > cap)
            out.held_bytes = 40 * len(ids)
            return out
        except Exception as exc:  # noqa: BLE001 - templates raise anything; never fail routing
            logger.debug("cannot tokenize a %s request for %s: %s", endpoint, model, exc)
            return None
