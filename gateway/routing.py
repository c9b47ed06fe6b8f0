"""What routing knows of a request's prompt: its length, its block keys, and how many of its
leading blocks each worker and the shared KV pool hold.

The CPU work on the client's input (the chat template, tokenizing, hashing block keys) runs
on the gateway's routing thread (gateway/worker_thread.py), within `routing_timeout_s` and
on at most `routing_max_chars` characters of the prompt. Past either bound the request is
still served, routed with what is known (nothing past a timeout, the prompt's start past the
size), and `beluga_gateway_prompts_unkeyed_total` / `..._truncated_total` say so. The prefix
index's per-request state (this gateway's record of what it routed where, the prompts' unread
keys) is only touched on that thread too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from beluga.pool_errors import KINDS as POOL_ERROR_KINDS
from beluga.pool_lookup import LOOKUP_PATH, MAX_KEYS, LookupReply, request_body
from beluga.settings import Settings
from gateway.metrics import GatewayMetrics
from gateway.policies import Choice, Policy, RequestInfo
from gateway.prefixes import PrefixIndex
from gateway.requests import ParsedRequest
from gateway.tokenize import Prompt, PromptTokenizer
from gateway.upstream import UpstreamClient, UpstreamError
from gateway.worker_thread import JobTimeout, WorkerThread
from gateway.workers import WorkerState
from kvpool.keys import ChainMemo, Identity, KeyChain

logger = logging.getLogger(__name__)

LOOKUP_BACKOFF_S = 5.0


def remote_error_kind(content: bytes) -> str:
    """The pool error kind a worker's lookup endpoint answered (its error code
    `pool_<kind>`, engine/pool_lookup_endpoint.py), else "error"."""
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "error"
    kind = code[len("pool_"):] if isinstance(code, str) and code.startswith("pool_") else ""
    return kind if kind in POOL_ERROR_KINDS else "error"


class Later(Iterator[bytes]):
    """A prompt's block keys not read yet, and about how many bytes reading them needs
    kept alive (the prompt's text or ids)."""

    def __init__(self, keys: Iterator[bytes], size: int) -> None:
        self.keys, self.size = keys, size

    def __iter__(self) -> Later:
        return self

    def __next__(self) -> bytes:
        return next(self.keys)


def request_template(payload: dict[str, Any]) -> bool:
    """Whether the request brings a chat template of its own (vLLM's `chat_template`, or
    one inside `chat_template_kwargs`)."""
    if payload.get("chat_template") is not None:
        return True
    kwargs = payload.get("chat_template_kwargs")
    return isinstance(kwargs, dict) and kwargs.get("chat_template") is not None


class Router:
    """Per-process routing state: the tokenizer, the key memo, the routing thread."""

    def __init__(self, settings: Settings, policy: Policy, prefixes: PrefixIndex,
                 tokenizer: PromptTokenizer, metrics: GatewayMetrics,
                 headers: dict[str, str]) -> None:
        self.settings = settings
        self.policy = policy
        self.prefixes = prefixes
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.headers = headers  # what every request to a worker carries
        self.client: UpstreamClient | None = None
        self.thread = WorkerThread()
        self.try_ids = itertools.count()  # one per try routed (PrefixIndex.routed)
        prefixes.owner = self.thread.post  # its per-request state: only on this thread
        self.key_memo = ChainMemo()
        self.lookup_backoff: dict[str, float] = {}  # worker id -> when to ask it again

    def close(self) -> None:
        self.thread.stop()

    def _unkeyed(self, req: ParsedRequest, reason: str) -> tuple[RequestInfo, Iterator[bytes]]:
        self.metrics.prompt_unkeyed(reason)
        return RequestInfo(model=req.model, endpoint=req.endpoint, stream=req.stream), iter(())

    async def route_info(self, req: ParsedRequest, workers: list[WorkerState]
                         ) -> tuple[RequestInfo, Iterator[bytes]]:
        """The request's prompt as the policies see it: length, block keys, and how many
        leading blocks each worker and the pool hold; and the prompt's later block keys, not
        read yet (nobody holds them), to be read off the request's critical path (on the
        routing thread)."""
        base = RequestInfo(model=req.model, endpoint=req.endpoint, stream=req.stream)
        if not self.policy.uses_prefixes:
            return base, iter(())
        ids = [w.id for w in workers]
        keying = self.prefixes.keying(ids)
        # A LoRA adapter's requests are tokenized as its base model's (vLLM does the same).
        model = next((w.record.model for w in workers), req.model)
        if keying is None or not self.tokenizer.knows(model):
            return base, iter(())
        if not self.tokenizer.loaded(model):  # (still loading, beside serving)
            return self._unkeyed(req, "tokenizer_loading")
        trusted = self.settings.trust_request_chat_template
        if req.endpoint == "chat" and not trusted and request_template(req.payload):
            # vLLM decides whether to render it; the gateway never does unless told to.
            return self._unkeyed(req, "request_template")
        salt = req.payload.get("cache_salt")
        adapter = None
        if model != req.model:  # an adapter's name
            adapter = self.prefixes.adapter(ids, req.model)
            if adapter is None:  # no worker says which weights it is: no keys for it
                return self._unkeyed(req, "adapter_unknown")
        identity = Identity(keying.fingerprint, salt if isinstance(salt, str) else "", adapter)
        max_chars = self.settings.routing_max_chars

        def keyed() -> tuple[Prompt, list[bytes], dict[str, int], int, Iterator[bytes]] | None:
            prompt = self.tokenizer.prompt(model, req.endpoint, req.payload,
                                           max_chars=max_chars, trust_templates=trusted)
            if prompt is None:
                return None
            # Tokenized and keyed only as far as some worker or the pool holds the prefix.
            later = Later(lazy_block_keys(prompt, identity, keying.block_tokens,
                                          self.key_memo), prompt.held_bytes)
            keys, local, pooled = self.prefixes.match(keying, ids, later)
            return prompt, keys, local, pooled, later

        deadline = time.monotonic() + self.settings.routing_timeout_s
        try:
            done = await self.thread.run(keyed, self.settings.routing_timeout_s)
        except JobTimeout as exc:  # (or the thread stopped: shutting down)
            return self._unkeyed(req, exc.reason)
        except Exception:  # a bug: logged, the request routed without keys
            logger.exception("keying a %s prompt failed", req.endpoint)
            return self._unkeyed(req, "error")
        if done is None:
            return self._unkeyed(req, "untokenizable")
        prompt, keys, local, pooled, later = done
        if prompt.truncated:
            self.metrics.prompt_truncated()
        remote = self.prefixes.remote_pool(keying)
        if (remote is not None and self.policy.uses_pool
                and self.settings.pool_lookup_timeout_s > 0):
            # The pool is not mapped here: a worker is asked about the keys read so far
            # (up to the first block no worker holds). Only if the pool holds all of them
            # is the rest of the prompt keyed and asked about: a new prompt costs one
            # round trip and no more tokenizing, a pooled one two round trips.
            pooled = await self.ask_pool(remote, keys, workers)
            if keys and pooled == len(keys):
                try:
                    rest = await self.thread.run(
                        lambda: list(later), max(0.0, deadline - time.monotonic()))
                except JobTimeout as exc:
                    rest = []
                    self.metrics.prompt_unkeyed(exc.reason)
                keys.extend(rest)
                pooled += await self.ask_pool(remote, rest, workers)
                later = iter(())
        sharers = None
        if keying.pool_uuid is not None and pooled:
            uuid = keying.pool_uuid
            sharers = frozenset(w for w in ids if self.prefixes.shares_pool(w, uuid))
            if len(sharers) == len(ids):
                sharers = None  # every worker
        return RequestInfo(
            model=req.model, endpoint=req.endpoint, stream=req.stream,
            prompt_tokens=prompt.estimate_total(), block_tokens=keying.block_tokens,
            keys=tuple(keys), local_blocks=local, pool_blocks=pooled,
            pool_workers=sharers), later

    async def ask_pool(self, pool_uuid: str, keys: list[bytes],
                       workers: list[WorkerState]) -> int:
        """How many leading `keys` the pool holds, as a worker sharing it says within
        `pool_lookup_timeout_s`; 0 when none can say. A worker that fails to answer is not
        asked again for LOOKUP_BACKOFF_S."""
        assert self.client is not None
        now = time.monotonic()
        sharers = [w for w in workers if w.healthy(now) and self.prefixes.shares_pool(
            w.id, pool_uuid) and self.lookup_backoff.get(w.id, 0.0) <= now]
        if not keys or not sharers:
            return 0
        worker = min(sharers, key=lambda w: w.in_flight)
        keys = keys[:MAX_KEYS]
        failed = "error"  # the result counted if the lookup fails other than by a timeout
        try:
            async with asyncio.timeout(self.settings.pool_lookup_timeout_s):
                resp = await self.client.request("POST", worker.url + LOOKUP_PATH,
                                                 request_body(pool_uuid, keys), self.headers)
                try:
                    content = await resp.read()
                finally:
                    resp.release()
            if resp.status != 200:
                failed = remote_error_kind(content) if resp.status == 503 else "error"
                raise UpstreamError(f"HTTP {resp.status}: {content[:200]!r}")
            reply = LookupReply.model_validate_json(content)
            if reply.pool_uuid != pool_uuid or reply.blocks > len(keys):
                raise UpstreamError(f"an answer for another lookup: {reply}")
        except (UpstreamError, TimeoutError, OSError, ValidationError) as exc:
            result = "timeout" if isinstance(exc, TimeoutError) else failed
            self.metrics.pool_lookup(result)
            self.lookup_backoff[worker.id] = now + LOOKUP_BACKOFF_S
            logger.warning("pool lookup on %s failed (%s: %s); not asking it for %gs",
                           worker.id, result, exc, LOOKUP_BACKOFF_S)
            return 0
        self.metrics.pool_lookup("ok")
        return reply.blocks

    def record(self, choice: Choice, info: RequestInfo, later: Iterator[bytes],
               try_id: int) -> None:
        """This gateway's record of what the worker will hold (on the routing thread, which
        alone touches the prefix index's per-request state), and the routing metrics."""
        worker_id = choice.worker.id
        # Only a prompt's unread keys are kept for its return: an empty stand-in (a retry,
        # a prompt read whole) would replace another prompt's at the same last key.
        rest, size = (later, later.size) if isinstance(later, Later) else (None, 0)
        self.thread.post(
            lambda: self.prefixes.routed(worker_id, info.keys, rest, size, try_id))
        self.metrics.routed(choice, info)

    def answered(self, try_id: int, computed: bool) -> None:
        """The try `record`ed as `try_id` ended its wait: its first token or whole answer
        came (`computed`), or it failed first (PrefixIndex.answered). Posted through the
        event loop, like `record` (a try that fails before it waits: after its record)."""
        def post() -> None:
            self.thread.post(lambda: self.prefixes.answered(try_id, computed))

        try:
            asyncio.get_running_loop().call_soon(post)
        except RuntimeError:  # not on the loop (a collected relay's finalizer)
            post()


def lazy_block_keys(prompt: Prompt, identity: Identity, block_tokens: int,
                    memo: ChainMemo) -> Iterator[bytes]:
    """The prompt's block keys (kvpool.keys.KeyChain), each tokenized only when asked for. A
    whole piece the memo has seen from the same chain state costs no hashing. Ends early,
    without an error, at the first piece that cannot be tokenized or keyed (routing on the
    keys before it)."""
    chain = KeyChain.of(identity, block_tokens, memo)
    parts = prompt.parts()
    while True:
        try:
            ids, piece = next(parts)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: route without it
            logger.debug("cannot tokenize the rest of a prompt: %s", exc)
            return
        try:
            yield from chain.extend(ids, memo, piece)
        except ValueError as exc:  # a token id no tokenizer makes: keys end here
            logger.debug("cannot key a prompt block: %s", exc)
            return
