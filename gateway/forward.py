"""Forwarding a routed request to a worker: tries, retries, answers and streams.

A request is tried on at most `max_attempts` workers. Each try is an `Attempt`: it opens the
worker's bookkeeping (in-flight count, prefill tokens the router expects) when it is sent
and closes it exactly once, whatever happens (an answer, a failure, a retry, a client gone,
a stream handed over to the relay and ended there). If connecting to (or reading from) a
worker fails before the client got any byte, the worker is taken out for
`unhealthy_cooldown_s` and the request is tried on another one. When every connection to
the workers stays busy for `upstream_queue_timeout_s`, the request is refused with 503 and
`Retry-After` instead of waiting longer.

Messages to clients name no worker address: what failed where goes to the log.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

from beluga.logs import current_request
from beluga.settings import Settings
from gateway.errors import (
    APIError,
    BadRequest,
    LoopDetected,
    NoHealthyWorker,
    NotFound,
    Overloaded,
    UpstreamFailure,
    UpstreamTimeout,
    normalize_upstream_error,
)
from gateway.front import Answer, Relay
from gateway.metrics import GatewayMetrics
from gateway.policies import Choice, Policy, RequestInfo
from gateway.requests import Endpoint, ParsedRequest
from gateway.routing import Router
from gateway.sse import UsageFilter, with_usage_body
from gateway.upstream import (
    ConnectFailed,
    Disconnected,
    Saturated,
    TooLarge,
    UpstreamClient,
    UpstreamError,
)
from gateway.upstream import Response as UpstreamResponse
from gateway.workers import WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)

UPSTREAM_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions",
                                       "completions": "/v1/completions"}
MAX_ANSWER_BYTES = 256 * 1024 * 1024  # a worker's whole (non-streamed) answer, at most
# Errors after which nothing reached the client and the worker is presumed down.
RETRYABLE = (ConnectFailed, Disconnected)


def failure_kind(exc: BaseException) -> str:
    """What went wrong with a worker, in words that name no address (for clients)."""
    if isinstance(exc, ConnectFailed):
        return "could not be reached"
    if isinstance(exc, Disconnected):
        return "closed the connection"
    return "failed"


def usage_of(content: bytes) -> object:
    """The `usage` object of a worker's JSON answer, read without parsing the rest (an
    answer with echoed prompts and logprobs runs to megabytes; vLLM writes `usage` last)."""
    at = content.rfind(b'"usage"')
    if at < 0:
        return None
    colon = content.find(b":", at + 7, at + 64)
    if colon < 0:
        return None
    try:
        value, _end = json.JSONDecoder().raw_decode(
            content[colon + 1:colon + 4096].decode("utf-8", "replace").lstrip())
    except (ValueError, RecursionError):
        return None
    return value


def lora_crash(endpoint: str, payload: dict[str, Any]) -> bool:
    """A request that kills a vLLM 0.32 engine started with --enable-lora on the CPU: more
    than one sequence with prompt logprobs (punica_cpu.add_lora_logits gets as many rows
    as prompt positions times sequences, its indices one per sequence; the einsum raises
    in the engine, and the engine stops). Refused at the gateway, for every request to a
    worker serving adapters."""
    several = any(_more_than_one(payload.get(k)) for k in ("n", "best_of"))
    prompt_logprobs = payload.get("prompt_logprobs") is not None or (
        endpoint == "completions" and payload.get("echo") is True
        and payload.get("logprobs") is not None)
    return several and prompt_logprobs


def _more_than_one(value: object) -> bool:
    """Whether vLLM would read `value` as a count above one (its models coerce numbers and
    numeric strings; `n` itself is checked to be an int by gateway/requests.py)."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return False
    return isinstance(value, int | float) and value > 1


def predicted(info: RequestInfo, worker_id: str, payload: dict[str, Any]) -> int | None:
    """The prompt tokens routing expects the worker to find cached, where the worker's
    report can be compared with it: not for several prompts in one request (usage sums
    them; routing saw the first), nor with prompt_logprobs (vLLM then skips its cache)."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return None
    if payload.get("prompt_logprobs") is not None:
        return None
    return info.held_tokens(worker_id)


class Attempt:
    """One try of a request on one worker. Opened when sent, `close()`d exactly once: as a
    context manager it closes on leaving, unless the stream relay took it over."""

    def __init__(self, worker: WorkerState, prefill: int,
                 on_answer: Callable[[bool], None] | None = None) -> None:
        self.worker = worker
        self.unprefilled = prefill
        self.open = True
        self.handed_over = False
        # Called once: at the first token (True), or at the close (whether the worker
        # answered whole: a failed try computed nothing the gateway can count on).
        self.on_answer = on_answer
        worker.begin(prefill)

    def _answered(self, computed: bool) -> None:
        if self.on_answer is not None:
            on_answer, self.on_answer = self.on_answer, None
            on_answer(computed)

    def prefilled(self) -> None:
        """The first token came back: the worker computed the prompt."""
        self.worker.prefilled(self.unprefilled)
        self.unprefilled = 0
        self._answered(True)

    def close(self, answered: bool = False) -> None:
        """The try ends; `answered`: with the worker's whole answer."""
        if self.open:
            self.open = False
            self.worker.done(self.unprefilled)
            self._answered(answered)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        if not self.handed_over:
            self.close()


def _close_unstarted(attempt: Attempt, resp: UpstreamResponse) -> None:
    """Finalizer of a relay generator: if it never ran, nobody closed its attempt."""
    if not resp.relayed:
        attempt.close()
        resp.release()


class Forwarder:
    def __init__(self, settings: Settings, workers: WorkerRegistry, policy: Policy,
                 router: Router, metrics: GatewayMetrics, headers: dict[str, str]) -> None:
        self.settings = settings
        self.workers = workers
        self.policy = policy
        self.router = router
        self.metrics = metrics
        self.headers = headers  # what every request to a worker carries
        self.client: UpstreamClient | None = None

    def candidates(self, req: ParsedRequest, tried: set[str]) -> list[WorkerState]:
        workers = self.workers.for_model(req.model)
        if not workers:
            if not self.workers.snapshot():
                raise NoHealthyWorker("no worker is registered; is any worker running?",
                                      code="no_worker")
            if bases := self.workers.ambiguous(req.model):
                raise NotFound(f"'{req.model}' names LoRA adapters of different base models "
                               f"({', '.join(bases)}) on different workers; it is served by "
                               "none until the workers agree", param="model",
                               code="model_ambiguous")
            raise NotFound(f"The model '{req.model}' does not exist; available: "
                           f"{', '.join(self.workers.models())}", param="model",
                           code="model_not_found")
        if any(w.record.adapters for w in workers) and lora_crash(req.endpoint, req.payload):
            raise BadRequest("n > 1 with prompt logprobs (echo with logprobs, or "
                             "prompt_logprobs) is not served by workers with LoRA adapters: "
                             "it stops their engine (vLLM 0.32's CPU LoRA logits path)",
                             param="n", code="unsupported_with_lora")
        now = time.monotonic()
        return [w for w in workers if w.healthy(now) and w.id not in tried]

    async def forward(self, req: ParsedRequest, body: bytes) -> Any:
        """The worker's answer (an `Answer`, a `Relay` or an error response); an APIError
        when no worker could give one."""
        strip_usage = False
        if req.stream:  # ask for usage (metrics); removed again if the client did not ask
            body, strip_usage = with_usage_body(body, req.payload)
        tried: set[str] = set()
        info: RequestInfo | None = None
        later: Iterator[bytes] = iter(())
        last_error: APIError | None = None
        started = time.perf_counter()
        for _ in range(self.settings.max_attempts):
            candidates = self.candidates(req, tried)
            if info is None:
                info, later = await self.router.route_info(
                    req, self.workers.for_model(req.model))
            choice = self.policy.select(candidates, info)
            if choice is None:
                break
            worker = choice.worker
            tried.add(worker.id)
            if (ctx := current_request.get()) is not None:
                ctx.worker = worker.id
            if logger.isEnabledFor(logging.DEBUG):  # its arguments cost per request
                logger.debug("routed to %s (%s, estimate %s): %d tokens, first key %s, "
                             "local %s, pool %d, candidates %s", worker.id, choice.reason,
                             choice.estimate_s, info.prompt_tokens,
                             info.keys[0].hex()[:12] if info.keys else None,
                             dict(info.local_blocks), info.pool_blocks,
                             [w.id for w in candidates])
            # Bookkeeping that can wait (this gateway's record of what the worker will hold,
            # the routing metrics) runs once this task waits for the worker's answer, that
            # is after the request is written: off the request's critical path. The rest of
            # the prompt's keys stay unread unless the prompt comes back.
            try_id = next(self.router.try_ids)
            asyncio.get_running_loop().call_soon(self.router.record, choice, info, later,
                                                 try_id)
            later = iter(())  # one reader; a retry elsewhere records what routing read
            headers = {"x-beluga-worker": worker.id, "x-beluga-route": choice.reason}
            with Attempt(worker, choice.prefill_tokens, functools.partial(
                    self.router.answered, try_id)) as attempt:
                try:
                    resp = await self.post(worker, req.endpoint, body)
                except RETRYABLE as exc:
                    last_error = self.failed(worker, exc)
                    continue
                except Saturated as exc:
                    logger.warning("no connection to %s came free: %s", worker.id, exc)
                    self.metrics.refusal("queue_timeout")
                    raise Overloaded("every connection to the workers is busy; try again "
                                     "shortly", code="overloaded") from None
                except TimeoutError:
                    raise UpstreamTimeout("the worker did not answer in time") from None
                except UpstreamError as exc:
                    last_error = self.failed(worker, exc)
                    continue
                if resp.status == LoopDetected.status_code:  # a gateway, not a worker
                    resp.release()
                    last_error = self.failed(worker, UpstreamError(
                        "it is a gateway (loop detected)"))
                    continue
                if resp.status != 200 or not req.stream:
                    try:
                        content = await resp.read(MAX_ANSWER_BYTES)
                    except RETRYABLE as exc:
                        last_error = self.failed(worker, exc)
                        continue
                    except TimeoutError:
                        raise UpstreamTimeout("the worker did not answer in time") from None
                    except TooLarge:
                        logger.warning("worker %s answered more than %d bytes; dropped",
                                       worker.id, MAX_ANSWER_BYTES)
                        raise UpstreamFailure("the worker's answer was too large",
                                              code="worker_error") from None
                    finally:
                        resp.release()
                    attempt.close(answered=resp.status == 200)
                    if resp.status == 200:
                        return Answer(content, resp.headers.get("content-type",
                                                                "application/json"),
                                      headers, functools.partial(
                                          self.answered, req.endpoint, worker, started,
                                          content, info, req.payload))
                    out = self.buffered_response(resp, content, headers)
                    self.metrics.answered(req.endpoint, out.status_code, worker.id,
                                          time.perf_counter() - started, worker.record.model)
                    return out
                stream = self.relay(resp, attempt, choice, info, started,
                                    UsageFilter(strip_usage), req.payload)
                attempt.handed_over = True
                # A client gone before the stream starts leaves the generator never run (its
                # finally too): close the attempt and the connection when it is collected.
                weakref.finalize(stream, _close_unstarted, attempt, resp)
                return Relay(stream, headers)
        raise last_error or NoHealthyWorker(
            f"no healthy worker can serve '{req.model}' right now", code="no_healthy_worker")

    def failed(self, worker: WorkerState, exc: BaseException) -> APIError:
        self.workers.mark_unhealthy(worker, f"failed ({exc!r})")
        return UpstreamFailure(f"the worker {failure_kind(exc)}; no other worker could "
                               "serve the request", code="worker_failed")

    async def post(self, worker: WorkerState, endpoint: Endpoint,
                   body: bytes) -> UpstreamResponse:
        """POST to a worker. Workers close idle kept-alive connections (vLLM after 5 s), and
        one can close just as it is reused: the worker never got that request, so it is
        sent again once, to the same worker (another would lose the prefix it was routed
        for). A worker that cannot be connected to at all is not retried here."""
        assert self.client is not None
        url = worker.url + UPSTREAM_PATHS[endpoint]
        headers = self.headers
        ctx = current_request.get()
        if ctx is not None:  # the request's id and trace context go on to the worker
            headers = {**headers, "x-request-id": ctx.request_id}
            if ctx.traceparent is not None:
                headers["traceparent"] = ctx.traceparent
                if ctx.tracestate is not None:
                    headers["tracestate"] = ctx.tracestate
        try:
            return await self.client.request("POST", url, body, headers)
        except Disconnected as exc:
            if not (exc.reused and exc.before_response):
                raise
            logger.info("worker %s closed a kept-alive connection (%s); sending again",
                        worker.id, exc)
            return await self.client.request("POST", url, body, headers)

    def answered(self, endpoint: Endpoint, worker: WorkerState, started: float,
                 content: bytes, info: RequestInfo, payload: dict[str, Any]) -> None:
        """Count a worker's 200 answer (once the client has it)."""
        usage = usage_of(content)
        model = worker.record.model
        self.metrics.usage(usage, model)
        self.metrics.prediction(predicted(info, worker.id, payload), info.block_tokens, usage)
        self.metrics.answered(endpoint, 200, worker.id, time.perf_counter() - started, model)

    @staticmethod
    def buffered_response(resp: UpstreamResponse, content: bytes,
                          headers: dict[str, str]) -> Any:
        """A worker's error answer, in the OpenAI error format."""
        from fastapi.responses import JSONResponse

        if resp.status >= 500:
            detail = normalize_upstream_error(resp.status, content)["error"]["message"]
            logger.warning("worker %s answered %d: %s", headers.get("x-beluga-worker"),
                           resp.status, detail[:500])
            return UpstreamFailure(f"the worker failed (HTTP {resp.status}): {detail[:500]}",
                                   code="worker_error").response()
        return JSONResponse(normalize_upstream_error(resp.status, content),
                            status_code=resp.status, headers=headers)

    async def relay(self, resp: UpstreamResponse, attempt: Attempt, choice: Choice,
                    info: RequestInfo, started: float, usage: UsageFilter,
                    payload: dict[str, Any]) -> AsyncIterator[bytes]:
        """Pass SSE bytes through; a worker failure mid-stream ends with an error event.
        The first chunk's arrival is the request's TTFT, which the policy learns from once
        the chunk is on its way to the client (the learning is off the client's TTFT)."""
        worker = attempt.worker
        model = worker.record.model
        last: float | None = None
        resp.relayed = True  # see _close_unstarted
        try:
            async for chunk in resp.chunks():
                now = time.perf_counter()
                if last is None:  # (before the yield: a client gone at it closes us there)
                    attempt.prefilled()
                out = usage.feed(chunk)
                if out:
                    yield out
                if last is None:
                    ttft = now - started
                    if (ctx := current_request.get()) is not None:
                        ctx.ttft_s = ttft
                    self.policy.observe(choice, info, ttft)
                    self.metrics.child(self.metrics.ttft, worker.id, self.metrics.policy,
                                       model).observe(ttft)
                else:
                    self.metrics.child(self.metrics.itl, worker.id, model).observe(now - last)
                last = now
            rest = usage.flush()
            if rest:
                yield rest
            self.metrics.usage(usage.usage, model)
            self.metrics.prediction(predicted(info, worker.id, payload), info.block_tokens,
                                    usage.usage)
            self.metrics.answered(info.endpoint, 200, worker.id, time.perf_counter() - started,
                                  model)
        except TimeoutError:
            self.metrics.answered(info.endpoint, UpstreamTimeout.status_code, worker.id, None,
                                  model)
            if (ctx := current_request.get()) is not None:
                ctx.error = "worker_silent_mid_stream"
            yield UpstreamTimeout("the worker went silent mid-stream").sse_event()
        except UpstreamError as exc:
            if (ctx := current_request.get()) is not None:
                ctx.error = "worker_failed_mid_stream"
            self.workers.mark_unhealthy(worker, f"failed mid-stream ({exc!r})")
            self.metrics.answered(info.endpoint, UpstreamFailure.status_code, worker.id, None,
                                  model)
            yield UpstreamFailure(f"the worker failed mid-stream (it {failure_kind(exc)})",
                                  code="worker_failed").sse_event()
        finally:
            attempt.close()
            resp.release()
