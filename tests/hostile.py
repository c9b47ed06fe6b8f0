"""Hostile input for a running Beluga stack: one definition of each class, shared by the
deterministic suite (tests/e2e/test_hostile.py) and the scripts (bench/hostile_sweep.py,
bench/fuzz_gateway.py).

Three kinds of class:

* request classes (`REQUEST_CLASSES`): lists of `Req`, hostile bodies, headers or raw bytes,
  each with what a correct gateway answers (`expect`: a 4xx for bad input, a 2xx, or either
  one when only the engine can judge the value) and how long that may take (`bound_s`);
* client classes (`CLIENT_CLASSES`): clients that misbehave on the wire (slow bodies and
  headers, half-open connections, abandoned requests, 64 MB bodies sent by urllib and the
  OpenAI SDK);
* stack classes (`poisoned_redis`, `stopped_worker`, `stopped_redis`): what the gateway's
  dependencies do to it (garbage in Redis, a frozen worker, a frozen or slow Redis).

Every class returns `Outcome`s; `Outcome.problem` says what a correct gateway would not have
done (None: nothing). Nothing here is random but what a caller asks for (`seed`): the suite
sends the same bytes every time.

Alongside, `HealthProbe` GETs /health every 50 ms from its own process (so the load this
process generates does not slow the probe) and samples the gateway's RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

MIB = 1024 * 1024
JSON = (("content-type", "application/json"),)
QUESTION = "What is the capital of France?"
VOCAB = 49152          # the default model's vocabulary (SmolLM2)
PREFIX = "beluga:v1"   # the stack's Redis key prefix
WORDS = ["river", "mountain", "quiet", "engine", "silver", "market", "garden", "letter",
         "winter", "doctor", "window", "signal", "harbor", "orange", "paper", "castle",
         "forest", "bridge", "camera", "pocket", "rabbit"]


# -- requests and what came of them -----------------------------------------------------
@dataclass(frozen=True)
class Req:
    """One hostile request. `expect`: "4xx" (bad input: refused), "ok" (a 2xx) or "any" (a
    2xx or a 4xx: the engine judges the value); never a 5xx. `raw`: bytes sent as they are
    on a new connection instead (malformed HTTP). `forbid_header`: a response header that
    must not appear (header injection)."""

    label: str
    body: bytes = b""
    path: str = "/v1/completions"
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = JSON
    expect: str = "4xx"
    bound_s: float = 30.0
    raw: bytes | None = None
    forbid_header: str | None = None
    chunked: bool = False  # send the body without a content-length

    def curl(self, base_url: str, limit: int = 600) -> str:
        """A command line reproducing it (the body shortened past `limit` bytes, saying how
        it goes on)."""
        if self.raw is not None:
            raw = shorten(self.raw, limit)
            host, port = host_port(base_url)
            return f"printf %s {shell_quote(raw)} | nc {host} {port}"
        return curl_command(self.method, base_url + self.path, dict(self.headers), self.body,
                            limit)


def host_port(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def shorten(data: bytes, limit: int) -> str:
    """`data` as text for a reproduction: the start, and how it goes on when long (a
    repeated unit is named as such)."""
    text = data.decode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return text
    head = data[:limit // 2].decode("utf-8", "backslashreplace")
    tail = data[-60:].decode("utf-8", "backslashreplace")
    return f"{head}...<{len(data) - limit // 2 - 60} more bytes, {len(data)} in all>...{tail}"


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def curl_command(method: str, url: str, headers: dict[str, str], body: bytes | None,
                 limit: int = 600) -> str:
    parts = ["curl", "-sS", "-X", method, shell_quote(url)]
    for k, v in headers.items():
        parts += ["-H", shell_quote(f"{k}: {v}")]
    if body:
        parts += ["--data-binary", shell_quote(shorten(body, limit))]
    return " ".join(parts)


@dataclass
class Outcome:
    cls: str
    label: str
    status: int | None           # None: no HTTP answer at all
    elapsed_s: float
    error_type: str | None = None
    error_code: str | None = None
    message: str = ""            # the error's message, or what went wrong on the wire
    problem: str | None = None   # what a correct gateway would not have done
    repro: str = ""              # how to send it again
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """What the answer was: ok, 4xx, gateway_bug (500 internal_error), worker_5xx
        (502/504), overloaded (503 with Retry-After), unavailable (503 otherwise),
        other_5xx, no_answer."""
        return status_kind(self.status, self.error_type, self.error_code)


def status_kind(status: int | None, error_type: str | None, error_code: str | None) -> str:
    if status is None:
        return "no_answer"
    if status < 400:
        return "ok"
    if status < 500:
        return "4xx"
    if status == 500 and error_type in ("internal_error", None):
        return "gateway_bug"
    if status in (502, 504):
        return "worker_5xx"
    if status == 503:
        return "overloaded" if error_code == "overloaded" else "unavailable"
    return "other_5xx"


def judge(expect: str, bound_s: float, o: Outcome) -> str | None:
    """What is wrong with `o` for a request expecting `expect` within `bound_s`."""
    if o.status is None:
        return f"no answer ({o.message[:200]})"
    kind = o.kind
    if kind == "gateway_bug":
        return f"500 from the gateway's own code: {o.message[:200]}"
    if o.status >= 500:
        what = "bad input" if expect == "4xx" else "this request"
        return f"{o.status} {o.error_type}/{o.error_code} for {what}: {o.message[:200]}"
    if o.elapsed_s > bound_s:
        return f"answered in {o.elapsed_s:.1f} s, over its bound of {bound_s:g} s"
    if expect == "4xx" and not 400 <= o.status < 500:
        return f"{o.status} where a 4xx was due"
    if expect == "ok" and not 200 <= o.status < 300:
        return f"{o.status} where a 2xx was due: {o.message[:200]}"
    return None


def error_fields(body: bytes) -> tuple[str | None, str | None, str]:
    try:
        err = json.loads(body)["error"]
        return err.get("type"), err.get("code"), str(err.get("message"))[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None, body[:300].decode("utf-8", "replace")


# -- sending ---------------------------------------------------------------------------
def raw_exchange(base_url: str, data: bytes, timeout_s: float,
                 trickle: float = 0.0) -> tuple[int | None, dict[str, str], bytes, str]:
    """Send `data` on a new connection (one byte per `trickle` s when set) and read one
    answer: (status or None, headers, body, what happened on the wire)."""
    host, port = host_port(base_url)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            try:
                if trickle:
                    for i in range(len(data)):
                        s.sendall(data[i:i + 1])
                        time.sleep(trickle)
                else:
                    s.sendall(data)
            except OSError as exc:  # the server may answer and close before all is sent
                sent_error = f"{type(exc).__name__} while sending"
            else:
                sent_error = ""
            buf = b""
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    return None, {}, buf, "timeout waiting for the answer"
                except OSError as exc:
                    if buf:
                        break
                    return None, {}, b"", f"{type(exc).__name__}: {exc} {sent_error}".strip()
                if not chunk:
                    break
                buf += chunk
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if sep:
                    headers = parse_head(head)[1]
                    n = headers.get("content-length")
                    if n is not None and n.isdigit() and len(rest) >= int(n):
                        break
            if not buf:
                return None, {}, b"", f"closed without an answer {sent_error}".strip()
            status, headers = parse_head(buf.partition(b"\r\n\r\n")[0])
            return status, headers, buf.partition(b"\r\n\r\n")[2], sent_error
    except OSError as exc:
        return None, {}, b"", f"{type(exc).__name__}: {exc}"


def parse_head(head: bytes) -> tuple[int | None, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status: int | None = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return status, headers


def send(client: httpx.Client, base_url: str, cls: str, req: Req) -> Outcome:
    """Send one Req; its Outcome, judged."""
    start = time.monotonic()
    timeout = req.bound_s + 15.0
    headers: dict[str, str] = {}
    if req.raw is not None:
        status, headers, body, wire = raw_exchange(base_url, req.raw, timeout)
    else:
        try:
            content: Any = req.body
            if req.chunked:
                data = req.body
                content = iter([data[i:i + MIB] for i in range(0, len(data), MIB)])
            resp = client.request(req.method, base_url + req.path, content=content,
                                  headers=dict(req.headers), timeout=timeout)
            status, body, wire = resp.status_code, resp.content, ""
            headers = {k.lower(): v for k, v in resp.headers.items()}
        except httpx.TimeoutException as exc:
            status, body, wire = None, b"", f"timeout ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            status, body, wire = None, b"", f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - start
    etype, code, message = error_fields(body) if status and status >= 400 else (None, None, "")
    o = Outcome(cls, req.label, status, elapsed, etype, code, message or wire,
                repro=req.curl(base_url), headers=headers)
    o.problem = judge(req.expect, req.bound_s, o)
    if o.problem is None and req.forbid_header and req.forbid_header.lower() in headers:
        o.problem = f"response carries an injected header {req.forbid_header!r}"
    return o


def run_requests(base_url: str, cls: str, reqs: Sequence[Req],
                 concurrency: int = 4) -> list[Outcome]:
    """Send `reqs`, `concurrency` at a time; their outcomes in order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits) as client, \
            ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(lambda r: send(client, base_url, cls, r), reqs))


# -- the request classes -----------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """How hard a run hits: the suite's (small, a few minutes for all) or the sweep's."""

    copies: int = 1          # times each heavy request is sent
    concurrency: int = 4     # requests in flight at once
    half_open: int = 200     # idle connections held open
    full: bool = False       # every value in every field, or a representative few
    messages: int = 10_000   # messages in the many-message chat


TEST = Scale()
SWEEP = Scale(copies=4, concurrency=8, half_open=800, full=True)


def ep(path: str) -> str:
    return "chat" if "chat" in path else "completions"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def words(rng: random.Random, nbytes: int) -> str:
    out: list[str] = []
    size = 0
    while size < nbytes:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:nbytes]


def chat(model: str, content: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 2, **extra}


def completion(model: str, prompt: Any = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": 2, **extra}


def with_literal(body: dict[str, Any], name: str, literal: str) -> bytes:
    """`body` with `name` set to a JSON literal as written (NaN, 1e400, a 5,000-digit
    integer: what json.dumps would not write)."""
    rest = {k: v for k, v in body.items() if k != name}
    text = json.dumps(rest)
    return f'{text[:-1]}, "{name}": {literal}}}'.encode()


def huge_json(model: str, s: Scale) -> list[Req]:
    """7 MiB bodies (just under the 8 MiB limit) of every shape: one string, millions of
    small values (which cost the JSON parser far more than their bytes), many keys; and
    bodies over the limit, declared or chunked."""
    rng = random.Random(1)
    big = 7 * MIB
    reqs = []
    for i in range(s.copies):
        reqs.append(Req(f"completions prompt string 7 MiB #{i}",
                        dumps(completion(model, words(rng, big))), bound_s=90))
        reqs.append(Req(f"chat content 7 MiB #{i}", dumps(chat(model, words(rng, big))),
                        path="/v1/chat/completions", bound_s=90))
    n = big // 2
    reqs += [
        Req("token ids: 3.5M valid ids (7 MiB)",
            b'{"model": "%s", "max_tokens": 2, "prompt": [' % model.encode()
            + b",".join([b"1"] * (n - 40)) + b"]}", bound_s=90),
        Req("2.4M empty lists (7 MiB)", b'{"model": "%s", "prompt": [' % model.encode()
            + b",".join([b"[]"] * (big // 3)) + b"]}"),
        Req("2.4M empty objects as messages (7 MiB)",
            b'{"model": "%s", "messages": [' % model.encode()
            + b",".join([b"{}"] * (big // 3)) + b"]}", path="/v1/chat/completions"),
        Req("1.8M floats (7 MiB)", b'{"model": "%s", "prompt": [' % model.encode()
            + b",".join([b"1e5"] * (big // 4)) + b"]}"),
        *[Req(f"2.4M empty objects in an extra field (7 MiB, held while forwarded) #{i}",
              b'{"model": "%s", "prompt": "Hi", "max_tokens": 1, "x": [' % model.encode()
              + b",".join([b"{}"] * (big // 3 - 40)) + b"]}", expect="any", bound_s=120)
          for i in range(s.concurrency)],
        *[Req(f"990k short strings in an extra field (6.6 MiB, held while forwarded) #{i}",
              (json.dumps(completion(model, max_tokens=1))[:-1] + ', "x": ['
               + ",".join(f'"{base36(k)}"' for k in range(990_000)) + "]}").encode(),
              expect="any", bound_s=120)
          for i in range(s.concurrency)],
        Req("820k distinct short keys (7.8 MiB, 1 object: under every count limit)",
            (json.dumps(completion(model))[:-1] + ","
             + ",".join(f'"_{base36(i)}":0' for i in range(820_000)) + "}").encode(),
            expect="any", bound_s=90),
        Req("300k extra keys (7 MiB)", (json.dumps(completion(model))[:-1] + ", "
            + ", ".join(f'"k{i}": {i}' for i in range(big // 24)) + "}").encode(),
            expect="any", bound_s=90),
        Req("declared 9 MiB body", dumps(completion(model, "a" * (9 * MIB)))),
        Req("chunked 9 MiB body (no content-length)",
            dumps(completion(model, "a" * (9 * MIB))), chunked=True),
    ]
    return reqs


def base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if not i:
            return out


def nested(depth: int, kind: str = "list") -> str:
    """JSON nesting `depth` containers deep."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def deep_json(model: str, s: Scale) -> list[Req]:
    """Nesting just under and over the gateway's limit (64 levels, the body's own object
    counted), at the JSON parser's own limit (~1,000) and far past it, in an extra field,
    the prompt and a message's content."""
    reqs = []
    base = json.dumps(completion(model))[:-1]
    for depth, expect in ((63, "any"), (64, "4xx"), (990, "4xx"), (1100, "4xx"),
                          (100_000, "4xx")):
        for kind in ("list", "dict") if s.full or depth in (63, 64) else ("list",):
            # The body object is level 1: an extra field nested `depth` deep makes 1 + depth.
            reqs.append(Req(f"extra field nested {depth} ({kind}s): {depth + 1} levels",
                            f'{base}, "x": {nested(depth, kind)}}}'.encode(), expect=expect))
    reqs.append(Req("prompt nested 500 lists",
                    f'{base[:base.index(chr(34) + "prompt")]}"prompt": {nested(500)}, '
                    f'"max_tokens": 2}}'.encode()))
    msg = json.dumps(chat(model))[:-1]
    reqs.append(Req("message content nested 60 levels (under the limit)",
                    f'{msg}, "messages": [{{"role": "user", "content": {nested(60)}}}]}}'
                    .encode(), path="/v1/chat/completions", expect="4xx"))
    reqs.append(Req("just under the limit, as objects, in chat_template_kwargs",
                    f'{msg}, "chat_template_kwargs": {nested(62, "dict")}}}'.encode(),
                    path="/v1/chat/completions", expect="any"))
    return reqs


def invalid_utf8(model: str, s: Scale) -> list[Req]:
    """Bytes that are not UTF-8 where text goes, and text that is valid JSON but no valid
    Unicode (lone surrogates), or odd encodings of valid JSON."""
    m = model.encode()
    good = dumps(completion(model))
    reqs = [
        Req("0xff in the model name", b'{"model": "\xff\xfe", "prompt": "Hi"}'),
        Req("0xff in the prompt", b'{"model": "%s", "prompt": "Hi \xff there"}' % m),
        Req("overlong encoding of '/'", b'{"model": "%s", "prompt": "\xc0\xaf"}' % m),
        Req("UTF-8-encoded surrogate", b'{"model": "%s", "prompt": "\xed\xa0\x80"}' % m),
        Req("truncated UTF-8 sequence at the end", b'{"model": "%s", "prompt": "\xe2\x82' % m),
        Req("0xff in a chat message", b'{"model": "%s", "messages": [{"role": "user", '
            b'"content": "\xff"}]}' % m, path="/v1/chat/completions"),
        Req("0xff in a role", b'{"model": "%s", "messages": [{"role": "\xff", '
            b'"content": "hi"}]}' % m, path="/v1/chat/completions"),
        Req("lone surrogate escape in the prompt",
            b'{"model": "%s", "max_tokens": 2, "prompt": "Hi \\ud800 there"}' % m,
            expect="any"),
        Req("lone surrogate escape in a chat message",
            b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", '
            b'"content": "\\udfff"}]}' % m, path="/v1/chat/completions", expect="any"),
        Req("lone surrogate in the model name",
            b'{"model": "\\ud800", "prompt": "Hi"}'),
        Req("lone surrogate in a stop string",
            b'{"model": "%s", "max_tokens": 2, "prompt": "Hi", "stop": ["\\ud800"]}' % m,
            expect="any"),
        Req("NUL characters in the prompt",
            b'{"model": "%s", "max_tokens": 2, "prompt": "a\\u0000b\\u0000"}' % m,
            expect="any"),
        Req("UTF-8 BOM before the body", b"\xef\xbb\xbf" + good, expect="any"),
        Req("UTF-16 body with a BOM", good.decode().encode("utf-16"), expect="any"),
        Req("UTF-16-LE body without a BOM, streamed",
            dumps(completion(model, stream=True)).decode().encode("utf-16-le"),
            expect="any"),
        Req("UTF-32 body", good.decode().encode("utf-32"), expect="any"),
        Req("Latin-1 body", '{"model": "%s", "prompt": "caf\u00e9"}'.encode("latin-1")
            % m),
    ]
    return reqs


def content_types(model: str, s: Scale) -> list[Req]:
    """Valid and invalid bodies under wrong or missing content types, wrong methods, and
    malformed HTTP framing (sent raw)."""
    good = dumps(completion(model))
    host = b"Host: x\r\n"
    reqs = [Req(f"content-type {ct!r}", good, headers=(("content-type", ct),), expect="any")
            for ct in ("text/plain", "application/x-www-form-urlencoded",
                       "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                       "application/xml", "image/png", "", "application/json, text/html")]
    reqs += [
        Req("no content-type", good, headers=(), expect="any"),
        Req("form-encoded body", b"model=%s&prompt=hi" % model.encode(),
            headers=(("content-type", "application/x-www-form-urlencoded"),)),
        Req("multipart body", b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            + model.encode() + b"\r\n--x--\r\n",
            headers=(("content-type", "multipart/form-data; boundary=x"),)),
        Req("gzip-encoded body (a bomb: 10 MiB of zeros)", gzip_bomb(),
            headers=(("content-type", "application/json"), ("content-encoding", "gzip"))),
        Req("GET on completions", b"", method="GET"),
        Req("PUT on chat", good, method="PUT", path="/v1/chat/completions"),
        Req("DELETE on completions", b"", method="DELETE"),
        Req("POST on /health", b"{}", path="/health"),
        Req("POST on /v1/models", b"{}", path="/v1/models"),
        Req("unknown path", good, path="/v1/../../etc/passwd"),
        Req("very long path", good, path="/v1/" + "a" * 60_000),
        Req("query string on completions", good, path="/v1/completions?x=" + "%00" * 1000,
            expect="any"),
    ]
    raws = [
        ("content-length and transfer-encoding both (smuggling)",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 4\r\n"
         b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
         b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("two different content-lengths",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 2\r\n"
         b"Content-Length: 40\r\n\r\n{}"),
        ("negative content-length",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: -1\r\n\r\n{}"),
        ("content-length 1e9 (not a number)",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 1e9\r\n\r\n{}"),
        ("content-length 2^64",
         b"POST /v1/completions HTTP/1.1\r\n" + host
         + b"Content-Length: 18446744073709551617\r\n\r\n{}"),
        ("bad chunk size",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n{}\r\n0\r\n\r\n"),
        ("header with a bare LF and NUL",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"X-A: a\nb\x00c\r\n"
         b"Content-Length: 2\r\n\r\n{}"),
        ("64 KiB header value",
         b"POST /v1/completions HTTP/1.1\r\n" + host + b"X-Big: " + b"a" * 65536
         + b"\r\nContent-Length: 2\r\n\r\n{}"),
        ("5,000 headers",
         b"POST /v1/completions HTTP/1.1\r\n" + host
         + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"Content-Length: 2\r\n\r\n{}"),
        ("garbage instead of HTTP", bytes(range(256)) * 4),
        ("HTTP/2 preface on HTTP/1.1", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ]
    reqs += [Req(label, raw=raw, expect="4xx", bound_s=15) for label, raw in raws]
    reqs.append(Req("HTTP/0.9-style request line", raw=b"GET /health\r\n\r\n", expect="any",
                    bound_s=15))
    return reqs


def gzip_bomb() -> bytes:
    import gzip

    return gzip.compress(b"\0" * (10 * MIB), compresslevel=9)


# Every numeric field of vLLM's chat and completions requests that a client may set.
NUMERIC_CHAT = ("max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k",
                "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "seed", "top_logprobs", "min_tokens", "truncate_prompt_tokens",
                "length_penalty", "priority", "prompt_logprobs")
NUMERIC_COMPLETIONS = ("max_tokens", "n", "best_of", "temperature", "top_p", "top_k",
                       "min_p", "presence_penalty", "frequency_penalty",
                       "repetition_penalty", "seed", "logprobs", "min_tokens",
                       "truncate_prompt_tokens", "length_penalty", "priority",
                       "prompt_logprobs")
ABSURD_FULL = ("-1", "0", "-0.0", "0.5", "2147483648", "4294967296", "18446744073709551617",
               "1" + "0" * 400, "1" + "0" * 5000, "1e308", "-1e308", "1e400", "-1e400",
               "1e-400", "NaN", "Infinity", "-Infinity", '"1"', "true", "[]", "{}")
ABSURD_TEST = ("-1", "18446744073709551617", "1" + "0" * 5000, "1e308", "-1e308", "1e400",
               "NaN", "-Infinity")


def absurd_numbers(model: str, s: Scale) -> list[Req]:
    """Every numeric field of both endpoints set to negative, huge, ±1e308, overflowing
    (1e400: infinity to Python's json) and NaN/Infinity literals (which Python's json
    reads): each a 4xx, or served when the engine finds the value acceptable."""
    values = ABSURD_FULL if s.full else ABSURD_TEST
    reqs = []
    for path, fields, body in (("/v1/chat/completions", NUMERIC_CHAT, chat(model)),
                               ("/v1/completions", NUMERIC_COMPLETIONS, completion(model))):
        for name in fields:
            base = dict(body, logprobs=True) if name == "top_logprobs" else body
            for literal in values:
                shown = literal if len(literal) < 24 else f"{literal[:6]}...({len(literal)})"
                reqs.append(Req(f"{ep(path)} {name}={shown}",
                                with_literal(base, name, literal), path=path, expect="any",
                                bound_s=30))
    return reqs


def huge_n(model: str, s: Scale) -> list[Req]:
    """`n` (and `best_of`) far past anything a worker runs at once."""
    reqs = []
    for n in (2**31 - 1, 10**6, 10**18, 2**64):
        reqs.append(Req(f"chat n={n}", dumps(chat(model, n=n)), path="/v1/chat/completions",
                        expect="any"))
        reqs.append(Req(f"completions n={n} streamed",
                        dumps(completion(model, n=n, stream=True)), expect="any"))
        reqs.append(Req(f"completions best_of={n}", dumps(completion(model, best_of=n)),
                        expect="any"))
    reqs.append(Req("chat n=64, 1 token each", dumps(chat(model, n=64, max_tokens=1)),
                    path="/v1/chat/completions", expect="any", bound_s=120))
    return reqs


def huge_lists(model: str, s: Scale) -> list[Req]:
    """Stop lists, stop token ids, bad words and logit_bias maps of every size and value."""
    rng = random.Random(2)
    chat_path = "/v1/chat/completions"
    many = 100_000 if s.full else 20_000
    reqs = [
        Req(f"stop: {many} strings", dumps(chat(model, stop=[f"s{i}" for i in range(many)])),
            path=chat_path, expect="any", bound_s=60),
        Req("stop: one 6 MiB string", dumps(chat(model, stop=[words(rng, 6 * MIB)])),
            path=chat_path, expect="any", bound_s=60),
        Req("stop: 1,000 strings of 4 KiB", dumps(completion(
            model, stop=[words(rng, 4096) for _ in range(1000)])), expect="any", bound_s=60),
        Req(f"stop_token_ids: {many * 5} ids", dumps(completion(
            model, stop_token_ids=list(range(many * 5)))), expect="any", bound_s=60),
        Req("stop_token_ids: out of range", dumps(completion(
            model, stop_token_ids=[-1, 2**40])), expect="any"),
        Req("bad_words: 10,000 words", dumps(completion(
            model, bad_words=[f"w{i}" for i in range(10_000)])), expect="any", bound_s=60),
        Req("logit_bias: every token id", dumps(chat(
            model, logit_bias={str(i): 1 for i in range(VOCAB)})), path=chat_path,
            expect="any", bound_s=60),
        Req(f"logit_bias: {many * 5} ids past the vocabulary", dumps(completion(
            model, logit_bias={str(VOCAB + i): 1 for i in range(many * 5)})),
            expect="any", bound_s=60),
        Req("logit_bias: negative and 2^64 ids", dumps(completion(
            model, logit_bias={"-1": 1, str(2**64): 1})), expect="any"),
        Req("logit_bias: non-numeric keys", dumps(completion(
            model, logit_bias={"abc": 1, "": 2, "1.5": 3})), expect="any"),
        Req("allowed_token_ids: every id", dumps(completion(
            model, allowed_token_ids=list(range(VOCAB)))), expect="any", bound_s=60),
        Req("allowed_token_ids: empty", dumps(completion(model, allowed_token_ids=[])),
            expect="any"),
    ]
    for literal in ("1e308", "-1e308", "NaN", "Infinity", "1e400", "18446744073709551617"):
        reqs.append(Req(f"logit_bias value {literal}", with_literal(
            completion(model), "logit_bias", f'{{"1": {literal}, "2": {literal}}}'),
            expect="any"))
    return reqs


def token_ids(model: str, s: Scale) -> list[Req]:
    """Token-id prompts outside the vocabulary, negative, at and past 2^32, non-integers,
    mixed and empty: a 400 each from the gateway (it checks them); ids in range are
    served."""
    literals = ["-1", str(VOCAB), str(VOCAB + 1), "2147483648", "4294967295", "4294967296",
                "18446744073709551616", "1" + "0" * 400, "1.5", "1e308", "1e400", "NaN",
                "-Infinity", "true", "null", '"1"', "[]", "{}"]
    reqs = []
    for lit in literals:
        shown = lit if len(lit) < 24 else f"{lit[:6]}...({len(lit)})"
        reqs.append(Req(f"prompt [1, {shown}]", with_literal(
            completion(model), "prompt", f"[1, {lit}]")))
        if s.full:
            reqs.append(Req(f"prompt [[1], [{shown}]]", with_literal(
                completion(model), "prompt", f"[[1, 2], [{lit}]]")))
    reqs += [
        Req("prompt []", dumps(completion(model, []))),
        Req("prompt [[]]", dumps(completion(model, [[]]))),
        Req("prompt [[1], 'a']", dumps(completion(model, [[1], "a"]))),
        Req("prompt [1, 'a']", dumps(completion(model, [1, "a"]))),
        Req("prompt [[1, -1]]", dumps(completion(model, [[1, -1]]))),
        Req("prompt [0, vocab - 1] (in range)", dumps(completion(model, [0, VOCAB - 1])),
            expect="any"),
        Req("prompt_embeds (untrusted tensor bytes)", dumps(
            completion(model, prompt_embeds="UEsDBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
            expect="any"),
        Req("prompt_token_ids in a chat body", dumps(chat(
            model, prompt_token_ids=[-1, 2**40])), path="/v1/chat/completions",
            expect="any"),
    ]
    return reqs


def header_injection(model: str, s: Scale) -> list[Req]:
    """CR/LF, NUL and oversize model names (the model goes into logs, metrics labels and
    error messages), and request headers a client must not be able to set."""
    reqs = []
    for name in ("m\r\nX-Injected: y", "m\nX-Injected: y", "m\rX-Injected: y",
                 f"{model}\r\nX-Injected: y", "m\x00", "m\u2028X-Injected: y",
                 "m\u0085X-Injected: y", "m" * 300, "m" * 100_000):
        shown = repr(name) if len(name) < 40 else f"'m' * {len(name)}"
        for path, body in (("/v1/chat/completions", chat(name)),
                           ("/v1/completions", completion(name))):
            reqs.append(Req(f"model {shown} ({ep(path)})", dumps(body),
                            path=path, forbid_header="x-injected"))
    reqs += [
        Req("model in URL encoding %0d%0a", dumps(completion("m%0d%0aX-Injected:%20y")),
            expect="4xx", forbid_header="x-injected"),
        Req("spoofed x-beluga-worker and routing headers", dumps(completion(model)),
            headers=(("content-type", "application/json"), ("x-beluga-worker", "evil"),
                     ("x-beluga-route", "evil"), ("x-forwarded-for", "1.2.3.4"),
                     ("host", "evil.example")), expect="ok",
            bound_s=30),
        Req("Authorization with 64 KiB", dumps(completion(model)),
            headers=(("content-type", "application/json"),
                     ("authorization", "Bearer " + "a" * 65536)), expect="any"),
    ]
    return reqs


TEMPLATES = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}x"
                    "{% endfor %}{% endfor %}",
    "huge output": "{{ 'x' * 1000000000 }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "include a file": "{% include '/etc/passwd' %}",
    "cycler over messages": "{% for m in messages * 1000000 %}{{ m.content }}{% endfor %}",
}


def request_templates(model: str, s: Scale) -> list[Req]:
    """Chat templates that come with the request (top level, and in chat_template_kwargs):
    the gateway never renders them unless trusted; vLLM refuses them unless trusted."""
    reqs = []
    for name, template in TEMPLATES.items():
        reqs.append(Req(f"chat_template: {name}", dumps(chat(model, chat_template=template)),
                        path="/v1/chat/completions", expect="4xx", bound_s=15))
        reqs.append(Req(f"chat_template_kwargs.chat_template: {name}", dumps(chat(
            model, chat_template_kwargs={"chat_template": template})),
            path="/v1/chat/completions", expect="4xx", bound_s=15))
    reqs += [
        Req("chat_template_kwargs: 10,000 keys", dumps(chat(
            model, chat_template_kwargs={f"k{i}": i for i in range(10_000)})),
            path="/v1/chat/completions", expect="any"),
        Req("chat_template_kwargs: add_generation_prompt as a string", dumps(chat(
            model, chat_template_kwargs={"add_generation_prompt": "{{ 7 * 7 }}"})),
            path="/v1/chat/completions", expect="any"),
        Req("chat_template_kwargs: messages overridden with 1M items", dumps(chat(
            model, chat_template_kwargs={"messages": [{"role": "user", "content": "x"}]
                                         * (1_000_000 if s.full else 100_000)})),
            path="/v1/chat/completions", expect="any", bound_s=60),
        Req("chat_template_kwargs: not an object", dumps(chat(
            model, chat_template_kwargs="{{ 7 * 7 }}")), path="/v1/chat/completions",
            expect="4xx"),
        Req("chat_template: not a string", dumps(chat(model, chat_template=["x"])),
            path="/v1/chat/completions", expect="4xx"),
    ]
    return reqs


def many_messages(model: str, s: Scale) -> list[Req]:
    """Chats of many messages: the gateway's template rendering is bounded (routed
    without keys past it), vLLM refuses the prompt as too long."""
    chat_path = "/v1/chat/completions"
    n = s.messages
    alternating = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
                   for i in range(n)]
    reqs = [
        Req(f"{n} messages", dumps(chat(model) | {"messages": alternating}), path=chat_path,
            expect="4xx", bound_s=90),
        Req(f"{n * 10} one-letter messages", dumps(chat(model) | {"messages": [
            {"role": "user", "content": "x"}] * (n * 10)}), path=chat_path, expect="4xx",
            bound_s=90),
        Req(f"one message of {n} content parts", dumps(chat(model) | {"messages": [
            {"role": "user", "content": [{"type": "text", "text": "x"}] * n}]}),
            path=chat_path, expect="any", bound_s=90),
        Req(f"{n} messages with odd roles", dumps(chat(model) | {"messages": [
            {"role": f"r{i}", "content": "x"} for i in range(n)]}), path=chat_path,
            expect="any", bound_s=90),
        Req(f"{n} tool calls", dumps(chat(model) | {"messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}} for i in range(n)]}]}),
            path=chat_path, expect="any", bound_s=90),
        Req("message with a 1 MiB name", dumps(chat(model) | {"messages": [
            {"role": "user", "content": "x", "name": "n" * MIB}]}), path=chat_path,
            expect="any", bound_s=60),
    ]
    return reqs


def repeated_huge_prompts(model: str, s: Scale) -> list[Req]:
    """The same and different long prompts again and again: each is tokenized by the
    gateway only as far as routing needs; its caches stay bounded in bytes."""
    rng = random.Random(3)
    same = words(rng, 7 * MIB)
    reqs = []
    for i in range(2 * s.copies + 1):
        reqs.append(Req(f"the same 7 MiB prompt #{i}", dumps(completion(model, same)),
                        expect="4xx", bound_s=90))
        reqs.append(Req(f"a new 3 MiB prompt #{i}", dumps(completion(
            model, words(rng, 3 * MIB))), expect="4xx", bound_s=90))
    if s.full:  # a 5 MiB answer (the gateway reads its usage)
        reqs.append(Req("3,500-token prompt with every logprob echoed", dumps(completion(
            model, words(random.Random(5), 20_000), max_tokens=1, echo=True, logprobs=20,
            prompt_logprobs=20)), expect="any", bound_s=180))
    long_ok = words(random.Random(4), 5000)  # ~1,000 tokens: served
    for i in range(2 * s.copies + 1):
        reqs.append(Req(f"a 1,000-token prompt, again #{i}", dumps(completion(
            model, long_ok + f" {i}", max_tokens=1)), expect="ok", bound_s=60))
    return reqs


REQUEST_CLASSES: dict[str, Callable[[str, Scale], list[Req]]] = {
    "huge_json": huge_json,
    "deep_json": deep_json,
    "invalid_utf8": invalid_utf8,
    "content_types": content_types,
    "absurd_numbers": absurd_numbers,
    "huge_n": huge_n,
    "huge_lists": huge_lists,
    "token_ids": token_ids,
    "header_injection": header_injection,
    "request_templates": request_templates,
    "many_messages": many_messages,
    "repeated_huge_prompts": repeated_huge_prompts,
}


# -- clients that misbehave on the wire ---------------------------------------------------
@dataclass(frozen=True)
class Target:
    base_url: str
    model: str
    header_timeout_s: float = 10.0   # the gateway's client_header_timeout_s
    body_timeout_s: float = 30.0     # the gateway's client_body_timeout_s


def head_of(path: str, length: int | None, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode()


def _closed_by_server(s: socket.socket, wait_s: float) -> tuple[bool, bytes]:
    """Whether the server closes `s` within `wait_s` (what it sent before, if anything)."""
    s.settimeout(wait_s)
    got = b""
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except OSError:
        return True, got
    return False, got


def slow_clients(t: Target, s: Scale) -> list[Outcome]:
    """At once: a body trickled forever (408 after the body timeout), a small valid body
    trickled over ~3 s (served), headers trickled forever (the connection closed after the
    header timeout), a body declared and never sent (408)."""
    body = dumps(completion(t.model, "Say hi", max_tokens=1))
    out: list[Outcome] = []
    lock = threading.Lock()

    def note(label: str, status: int | None, elapsed: float, message: str,
             problem: str | None, repro: str = "") -> None:
        with lock:
            out.append(Outcome("slow_clients", label, status, elapsed, message=message,
                               problem=problem, repro=repro))

    def trickle_forever() -> None:
        start = time.monotonic()
        head = head_of("/v1/completions", 10_000)
        status, _h, rbody, wire = raw_exchange_trickled(
            t.base_url, head, b" ", 0.2, t.body_timeout_s + 20)
        took = time.monotonic() - start
        bound = t.body_timeout_s + 5
        problem = None
        if status != 408:
            problem = f"{status} ({wire}) where 408 was due"
        elif took > bound:
            problem = f"408 after {took:.1f} s, over {bound:g} s"
        note("body trickled forever: 1 byte per 200 ms", status, took,
             error_fields(rbody)[2] or wire, problem,
             "python: send headers with Content-Length: 10000, then 1 byte every 200 ms")

    def trickle_valid() -> None:
        start = time.monotonic()
        whole = head_of("/v1/completions", len(body)) + body
        status, _h, rbody, wire = raw_exchange(t.base_url, whole, 60,
                                               trickle=3.0 / len(whole))
        took = time.monotonic() - start
        problem = None if status == 200 else f"{status} ({wire}) where 200 was due"
        note(f"valid {len(body)}-byte request trickled over ~3 s", status, took,
             error_fields(rbody)[2] if status != 200 else "", problem)

    def declared_never_sent() -> None:
        start = time.monotonic()
        status, _h, rbody, wire = raw_exchange(t.base_url, head_of("/v1/completions", 500),
                                               t.body_timeout_s + 20)
        took = time.monotonic() - start
        problem = None if status == 408 and took <= t.body_timeout_s + 5 else (
            f"{status} after {took:.1f} s ({wire}) where 408 within "
            f"{t.body_timeout_s + 5:g} s was due")
        note("body declared (500 bytes), never sent", status, took,
             error_fields(rbody)[2] or wire, problem)

    def headers_trickled() -> None:
        start = time.monotonic()
        host, port = host_port(t.base_url)
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
            closed = False
            i = 0
            while time.monotonic() - start < t.header_timeout_s + 8:
                try:
                    sock.sendall(b"X-%d: y\r\n" % i)
                except OSError:
                    closed = True
                    break
                i += 1
                done, _ = _closed_by_server(sock, 1.0)
                if done:
                    closed = True
                    break
        took = time.monotonic() - start
        problem = None if closed else (f"a connection trickling headers was still open after "
                                       f"{took:.0f} s (header timeout "
                                       f"{t.header_timeout_s:g} s)")
        note("headers trickled: one per second", 0 if closed else None, took,
             "closed by the server" if closed else "open", problem)

    jobs = [trickle_forever, trickle_valid, declared_never_sent, headers_trickled]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()
    return out


def raw_exchange_trickled(base_url: str, head: bytes, unit: bytes, every_s: float,
                          timeout_s: float) -> tuple[int | None, dict[str, str], bytes, str]:
    """Send `head`, then `unit` every `every_s` until the server answers or closes."""
    host, port = host_port(base_url)
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(head)
        buf = b""
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                s.sendall(unit)
            s.settimeout(every_s)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                return None, {}, buf, f"{type(exc).__name__}"
            if not chunk:
                break
            buf += chunk
            if b"\r\n\r\n" in buf:
                head_b, _, rest = buf.partition(b"\r\n\r\n")
                status, headers = parse_head(head_b)
                n = headers.get("content-length", "")
                if n.isdigit() and len(rest) >= int(n):
                    return status, headers, rest, ""
        if not buf:
            return None, {}, b"", "closed or timed out without an answer"
        status, headers = parse_head(buf.partition(b"\r\n\r\n")[0])
        return status, headers, buf.partition(b"\r\n\r\n")[2], ""


def half_open(t: Target, s: Scale, during: Callable[[], list[Outcome]] | None = None
              ) -> list[Outcome]:
    """`s.half_open` connections opened and left silent (a third send half a request
    line, a third complete headers and no body): meanwhile real requests are served
    (`during`, by default three chats); after the header timeout, the silent ones and the
    half-headed ones are closed by the server."""
    host, port = host_port(t.base_url)
    socks: list[tuple[str, socket.socket]] = []
    out: list[Outcome] = []
    start = time.monotonic()
    try:
        for i in range(s.half_open):
            try:
                sock = socket.create_connection((host, port), timeout=5)
            except OSError as exc:
                out.append(Outcome("half_open", f"connection #{i} refused", None,
                                   time.monotonic() - start, message=repr(exc),
                                   problem=f"could not open connection #{i}: {exc!r}"))
                break
            kind = ("silent", "half request line", "headers, no body")[i % 3]
            if kind == "half request line":
                sock.sendall(b"POST /v1/comp")
            elif kind == "headers, no body":
                sock.sendall(head_of("/v1/completions", 100))
            socks.append((kind, sock))
        served = during() if during is not None else [
            send_chat(t, f"chat while {len(socks)} connections are held")
            for _ in range(3)]
        out += served
        # The server closes the silent and half-headed ones after its header timeout; the
        # bodiless ones get a 408 after its body timeout (slow_clients checks that).
        wait = max(0.0, start + t.header_timeout_s + 3 - time.monotonic())
        time.sleep(wait)
        still = Counter()
        for kind, sock in socks:
            if kind == "headers, no body":
                continue
            closed, _ = _closed_by_server(sock, 0.05)
            if not closed:
                still[kind] += 1
        n = sum(1 for k, _ in socks if k != "headers, no body")
        problem = (f"{dict(still)} of {n} idle connections still open "
                   f"{time.monotonic() - start:.0f} s after opening (header timeout "
                   f"{t.header_timeout_s:g} s)") if still else None
        out.append(Outcome("half_open", f"{n} silent or half-headed connections closed by "
                           "the server", None if problem else 0, time.monotonic() - start,
                           message=str(dict(still)), problem=problem))
    finally:
        for _, sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
    return out


def send_chat(t: Target, label: str, cls: str = "half_open", max_tokens: int = 4,
              bound_s: float = 30.0) -> Outcome:
    req = Req(label, dumps(chat(t.model, QUESTION, max_tokens=max_tokens, temperature=0)),
              path="/v1/chat/completions", expect="ok", bound_s=bound_s)
    with httpx.Client() as client:
        return send(client, t.base_url, cls, req)


def worker_urls(base_url: str) -> list[str]:
    return [w["url"] for w in httpx.get(f"{base_url}/health", timeout=5).json()["workers"]]


def running_on_workers(urls: Iterable[str]) -> float:
    """vLLM's count of running requests, over `urls`."""
    total = 0.0
    for url in urls:
        with contextlib.suppress(httpx.HTTPError):
            for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
                if line.startswith("vllm:num_requests_running"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(urls: list[str], within_s: float) -> tuple[bool, float]:
    """Whether the workers run nothing within `within_s`, and how long that took."""
    start = time.monotonic()
    while True:
        if running_on_workers(urls) == 0:
            return True, time.monotonic() - start
        if time.monotonic() - start > within_s:
            return False, time.monotonic() - start
        time.sleep(0.2)


LONG = {"temperature": 0, "max_tokens": 1500, "ignore_eos": True}


def abandoned(t: Target, s: Scale, cancel_within_s: float = 8.0) -> list[Outcome]:
    """Streams and non-streamed requests the client gives up on (after a few events, after
    a second, before its body is complete): the worker's request is aborted within
    `cancel_within_s` (vLLM's running count back to 0), the gateway goes on."""
    urls = worker_urls(t.base_url)
    out: list[Outcome] = []
    ok, _ = wait_idle(urls, 60)
    if not ok:
        return [Outcome("abandoned", "workers idle before the class", None, 60,
                        problem="the workers were still running requests before it started")]
    host, port = host_port(t.base_url)

    def check(label: str, started: float) -> None:
        idle, took = wait_idle(urls, cancel_within_s)
        out.append(Outcome("abandoned", label, 0 if idle else None,
                           time.monotonic() - started,
                           message=f"workers idle {took:.1f} s after the client left",
                           problem=None if idle else (
                               f"the worker still ran the request {cancel_within_s:g} s "
                               f"after its client left")))

    for i in range(s.copies):
        # A stream read for a few events, then closed.
        started = time.monotonic()
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{t.base_url}/v1/chat/completions",
                json=chat(t.model, f"Write a long story #{i}.", stream=True, **LONG)) as r:
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                if events >= 3:
                    break
        check(f"stream closed after 3 events #{i}", started)

        # A non-streamed request, the connection closed after a second.
        started = time.monotonic()
        body = dumps(completion(t.model, f"Write a long story #{i}.", **LONG))
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(head_of("/v1/completions", len(body)) + body)
            time.sleep(1.0)
            running = running_on_workers(urls)
        if running < 1:
            out.append(Outcome("abandoned", f"non-streamed request running after 1 s #{i}",
                               None, time.monotonic() - started,
                               problem="no worker ran it 1 s after it was sent"))
        check(f"non-streamed request abandoned after 1 s #{i}", started)

        # A non-streamed request whose client shuts down its sending side only (a
        # half-close: still reading).
        started = time.monotonic()
        short = dumps(completion(t.model, "Say hi", max_tokens=2))
        with socket.create_connection((host, port), timeout=60) as sock:
            sock.sendall(head_of("/v1/completions", len(short)) + short)
            sock.shutdown(socket.SHUT_WR)
            _closed, got = _closed_by_server(sock, 60)
        status = parse_head(got.partition(b"\r\n\r\n")[0])[0] if got else None
        # (Informational: uvicorn closes a connection at the client's EOF, so such a
        # client gets no answer; HTTP allows a half-close, few clients do it.)
        out.append(Outcome("abandoned", f"half-closed client (informational) #{i}: "
                           f"{'answered' if status == 200 else 'not answered'}",
                           status if status is not None else 0, time.monotonic() - started,
                           message=got[:200].decode("latin-1")))

        # A body abandoned half-way.
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(head_of("/v1/completions", len(body)) + body[:len(body) // 2])
        out.append(Outcome("abandoned", f"body abandoned half-way #{i}", 0,
                           time.monotonic() - started))

        # Streams abandoned at once, many together.
        started = time.monotonic()
        socks = []
        sbody = dumps(chat(t.model, "Count to a thousand.", stream=True, **LONG))
        for _ in range(8):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(head_of("/v1/chat/completions", len(sbody)) + sbody)
            socks.append(sock)
        time.sleep(1.5)
        for sock in socks:
            sock.close()
        check(f"8 streams closed after 1.5 s #{i}", started)
    out.append(send_chat(t, "chat after the abandoned ones", cls="abandoned"))
    return out


def big_bodies(t: Target, s: Scale, size: int = 64 * MIB) -> list[Outcome]:
    """A 64 MB body sent by clients that send it all before reading (urllib, the OpenAI
    SDK, requests, httpx, chunked): each must read the 413, not a broken pipe."""
    import openai
    import requests

    out: list[Outcome] = []
    prompt = "a" * size
    payload = dumps(completion(t.model, prompt))
    url = f"{t.base_url}/v1/completions"
    bound = 30.0

    def record(label: str, started: float, status: int | None, message: str) -> None:
        took = time.monotonic() - started
        if status is None:
            problem = f"no readable answer: {message[:200]}"
        elif status != 413:
            problem = f"{status} where 413 was due: {message[:200]}"
        elif took > bound:
            problem = f"413 after {took:.1f} s"
        else:
            problem = None
        out.append(Outcome("big_bodies", label, status, took, message=message[:300],
                           problem=problem,
                           repro=f"python: {label} with a {len(payload) // MIB} MiB body"))

    started = time.monotonic()
    try:
        urllib.request.urlopen(urllib.request.Request(
            url, data=payload, headers={"content-type": "application/json"}), timeout=60)
        record("urllib.request.urlopen", started, 200, "accepted")
    except urllib.error.HTTPError as exc:
        record("urllib.request.urlopen", started, exc.code, exc.read().decode()[:300])
    except (urllib.error.URLError, OSError) as exc:
        record("urllib.request.urlopen", started, None, repr(exc))

    started = time.monotonic()
    client = openai.OpenAI(base_url=f"{t.base_url}/v1", api_key="x", max_retries=0,
                           timeout=60)
    try:
        client.completions.create(model=t.model, prompt=prompt, max_tokens=1)
        record("openai SDK completions.create", started, 200, "accepted")
    except openai.APIStatusError as exc:
        record("openai SDK completions.create", started, exc.status_code, str(exc))
    except openai.APIError as exc:
        record("openai SDK completions.create", started, None, repr(exc))
    started = time.monotonic()
    try:
        client.chat.completions.create(model=t.model, max_tokens=1, messages=[
            {"role": "user", "content": prompt}])
        record("openai SDK chat.completions.create", started, 200, "accepted")
    except openai.APIStatusError as exc:
        record("openai SDK chat.completions.create", started, exc.status_code, str(exc))
    except openai.APIError as exc:
        record("openai SDK chat.completions.create", started, None, repr(exc))
    client.close()

    started = time.monotonic()
    try:
        r = requests.post(url, data=payload, headers={"content-type": "application/json"},
                          timeout=60)
        record("requests.post", started, r.status_code, r.text)
    except requests.RequestException as exc:
        record("requests.post", started, None, repr(exc))

    for label, content in (("httpx.post", payload),
                           ("httpx.post, chunked", iter([payload[i:i + MIB] for i in
                                                         range(0, len(payload), MIB)]))):
        started = time.monotonic()
        try:
            r2 = httpx.post(url, content=content, timeout=60,
                            headers={"content-type": "application/json"})
            record(label, started, r2.status_code, r2.text)
        except httpx.HTTPError as exc:
            record(label, started, None, repr(exc))
    out.append(send_chat(t, "chat after the 64 MB bodies", cls="big_bodies"))
    return out


CLIENT_CLASSES: dict[str, Callable[[Target, Scale], list[Outcome]]] = {
    "slow_clients": slow_clients,
    "half_open": half_open,
    "abandoned": abandoned,
    "big_bodies": big_bodies,
}


# -- the stack's dependencies: Redis and the workers ---------------------------------------
def poison_records(now: float, tag: str = "poison") -> tuple[list[tuple[str, str, Any]],
                                                            list[str]]:
    """Garbage for every field of a worker record and of a hints record, and for the
    hint-key sets: (Redis command, key, value) to write, and every key written (to delete).
    The hints need a valid worker record to be read at all: each garbage hints record has
    its own valid worker, of a model nobody asks for, at an address nothing listens on."""
    p = f"{PREFIX}:worker:"
    good = {"schema": 1, "id": "x", "url": "http://127.0.0.1:9", "model": f"{tag}-model",
            "capacity": 1, "pid": 1, "started_at": now, "heartbeat_at": now,
            "running": 0, "waiting": 0}

    def rec(**kv: Any) -> str:
        return json.dumps(dict(good, **kv))

    def lit(name: str, literal: str, wid: str) -> str:
        text = json.dumps({k: v for k, v in dict(good, id=wid).items() if k != name})
        return f'{text[:-1]}, "{name}": {literal}}}'

    writes: list[tuple[str, str, Any]] = []
    n = 0

    def worker(value: Any, wid: str | None = None, cmd: str = "set") -> None:
        nonlocal n
        n += 1
        wid = wid or f"{tag}-w{n}"
        if isinstance(value, str) and '"id": "x"' in value:
            value = value.replace('"id": "x"', json.dumps({"id": wid})[1:-1])
        writes.append((cmd, p + wid, value))

    for url in ("file:///etc/passwd", "http://h:0", "http://127.0.0.1:8100\r\nX-Injected: y",
                "http://127.0.0.1:99999", "gopher://127.0.0.1:70", "http://u:p@127.0.0.1:80",
                "http://127.0.0.1:80/v1?x=1", " http://127.0.0.1:80", "http://",
                "http://[::1", "http://127.0.0.1:80#frag", "javascript:alert(1)",
                "http://127.0.0.1:80/\x00", "http://" + "a" * 600 + ":80", "unix:///tmp/s"):
        worker(rec(url=url))
    for name, literal in (("capacity", "NaN"), ("capacity", "1e308"), ("capacity", "-5"),
                          ("capacity", '"32"'), ("capacity", "0"), ("capacity", "true"),
                          ("heartbeat_at", "NaN"), ("heartbeat_at", "Infinity"),
                          ("heartbeat_at", "1e300"), ("heartbeat_at", "-1"),
                          ("started_at", "-Infinity"), ("pid", "-1"),
                          ("pid", "9223372036854775808"), ("running", "1e308"),
                          ("waiting", "-1"), ("running", "1" + "0" * 5000),
                          ("schema", "2"), ("schema", '"1"'), ("schema", "true"),
                          ("id", "null"), ("model", '"m\\r\\nX: y"'), ("model", '""'),
                          ("model", json.dumps("m" * 10_000)), ("url", "null")):
        n += 1
        wid = f"{tag}-w{n}"
        writes.append(("set", p + wid, lit(name, literal, wid)))
    worker(b"\xff\xfe\xfd not utf-8")
    worker(b'{"schema": 1, "id": "\xff\xfe", "url": "http://127.0.0.1:9"}')
    worker(json.dumps(dict(good, pad="x" * MIB)))
    worker("[" * 100_000 + "]" * 100_000)
    worker("[]")
    worker('"a string"')
    worker("null")
    worker("")
    worker({"a", "b"}, cmd="sadd")
    worker({"f": "v"}, cmd="hset")
    worker(["x"], cmd="rpush")
    worker(rec(id="someone-else"))          # key and record disagree
    writes.append(("set", p + f"{tag} id with spaces", rec(id=f"{tag} id with spaces")))
    writes.append(("set", p + f"{tag}-crlf\r\nX: y", rec(id=f"{tag}-crlf\r\nX: y")))
    writes.append(("set", p + tag + "-" + "i" * 10_000, rec(id=tag + "-" + "i" * 10_000)))
    writes.append(("set", f"{p}{tag}-".encode() + b"\xff\xfe", rec(id=f"{tag}-\xff")))

    # Hints: each with its own valid worker.
    hints_good = {"schema": 1, "worker_id": "x", "fingerprint": "0" * 64, "block_tokens": 32,
                  "pool_uuid": None, "pool_path": None, "keys": 0, "updated_at": now}
    fifo = f"/dev/shm/{tag}-{os.getpid()}.fifo"
    garbage_hints: list[tuple[str, Any]] = []
    for name, literal in (("fingerprint", '"zz"'), ("fingerprint", json.dumps("0" * 64 + "\n")),
                          ("block_tokens", "0"), ("block_tokens", "NaN"),
                          ("block_tokens", "100000"), ("pool_uuid", '"../../etc/passwd"'),
                          ("pool_uuid", '"00000000-0000-0000-0000-00000000000G"'),
                          ("pool_path", '"/etc/passwd"'),
                          ("pool_path", '"/dev/shm/../../etc/shadow"'),
                          ("pool_path", json.dumps("/dev/shm/x\r\nX: y")),
                          ("pool_path", '"relative/path"'), ("keys", "-1"),
                          ("keys", "1e400"), ("updated_at", "Infinity"),
                          ("worker_id", '"someone-else"'), ("schema", "7")):
        text = json.dumps({k: v for k, v in hints_good.items() if k != name})
        garbage_hints.append((f"{name}={literal[:30]}", f'{text[:-1]}, "{name}": {literal}}}'))
    # A pool the gateway would look for, at paths that are no pool (a FIFO, /dev/zero).
    for path in (fifo, "/dev/zero", "/dev/null"):
        garbage_hints.append((f"pool at {path}", json.dumps(dict(
            hints_good, pool_uuid="12345678-1234-5678-1234-567812345678", pool_path=path))))
    garbage_hints += [("not utf-8", b"\xff\xfe"), ("not json", "{"), ("huge", "x" * MIB)]
    hint_sets: list[tuple[str, str, Any]] = [
        ("non-hex members", "sadd", {"zz", "\xff", "a" * 33, "A" * 32}),
        ("a string, not a set", "set", "x"),
        ("300,000 members", "sadd", [f"{i:032x}" for i in range(300_000)]),
    ]
    for i, (_label, value) in enumerate(garbage_hints):
        wid = f"{tag}-h{i}"
        writes.append(("set", p + wid, rec(id=wid)))
        if isinstance(value, str) and '"worker_id": "x"' in value:
            value = value.replace('"worker_id": "x"', json.dumps({"worker_id": wid})[1:-1])
        writes.append(("set", f"{PREFIX}:hints:{wid}", value))
    for i, (_label, cmd, value) in enumerate(hint_sets):
        wid = f"{tag}-s{i}"
        writes.append(("set", p + wid, rec(id=wid)))
        writes.append(("set", f"{PREFIX}:hints:{wid}", json.dumps(dict(hints_good,
                                                                      worker_id=wid))))
        writes.append((cmd, f"{PREFIX}:hints:{wid}:blocks", value))
    return writes, [key for _cmd, key, _v in writes]


def write_poison(client: Any, writes: list[tuple[str, str, Any]]) -> None:
    import redis as redis_lib

    for path in {json.loads(v)["pool_path"] for _c, k, v in writes
                 if isinstance(v, str) and ".fifo" in v}:
        with contextlib.suppress(FileExistsError):
            os.mkfifo(path)
    for cmd, key, value in writes:
        try:
            if cmd == "set":
                client.set(key, value, ex=600)
            elif cmd == "sadd":
                values = list(value)
                for i in range(0, len(values), 10_000):
                    client.sadd(key, *values[i:i + 10_000])
                client.expire(key, 600)
            elif cmd == "hset":
                client.hset(key, mapping=value)
                client.expire(key, 600)
            elif cmd == "rpush":
                client.rpush(key, *value)
                client.expire(key, 600)
        except redis_lib.RedisError as exc:
            raise AssertionError(f"could not write {key!r}: {exc}") from exc


def clean_poison(client: Any, keys: Sequence[str], tag: str = "poison") -> None:
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    for key in client.scan_iter(match=f"{PREFIX}:*{tag}*"):
        client.delete(key)
    for path in Path("/dev/shm").glob(f"{tag}-{os.getpid()}.fifo"):
        path.unlink(missing_ok=True)


def metric_total(base_url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_labels(base_url: str, name: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name):]] = float(value)
    return out


INVALID = "beluga_gateway_registry_invalid_records_total"


def poisoned_redis(t: Target, redis_url: str, settle_s: float = 4.0,
                   gone_within_s: float = 30.0) -> list[Outcome]:
    """Garbage in every field of the registry's records, written into the stack's Redis:
    the gateway keeps serving, never routes to a garbage address, counts the records in
    `beluga_gateway_registry_invalid_records_total`; all of it deleted afterwards."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url, socket_timeout=10)
    out: list[Outcome] = []
    writes, keys = poison_records(time.time())
    before = metric_labels(t.base_url, INVALID)
    start = time.monotonic()
    try:
        write_poison(client, writes)
        time.sleep(settle_s)  # a few registry refreshes
        for i in range(4):
            out.append(send_chat(t, f"chat with poisoned Redis #{i}", cls="poisoned_redis"))
        health = httpx.get(f"{t.base_url}/health", timeout=5).json()
        listed = [w for w in health["workers"] if w["model"] == "poison-model"]
        bad = [w["id"] for w in listed if w["url"] != "http://127.0.0.1:9"]
        out.append(Outcome("poisoned_redis", "only valid records listed", 0 if not bad else None,
                           time.monotonic() - start, message=f"{len(listed)} valid stand-ins",
                           problem=f"garbage workers listed: {bad[:5]}" if bad else None))
        after = metric_labels(t.base_url, INVALID)
        grew = {k: after[k] - before.get(k, 0.0) for k in after
                if after[k] > before.get(k, 0.0)}
        kinds = {k.split('kind="', 1)[1].split('"', 1)[0] for k in grew if 'kind="' in k}
        missing = {"worker", "hints", "hint_keys"} - kinds
        out.append(Outcome(
            "poisoned_redis", f"{INVALID} counts them", 0 if not missing else None,
            time.monotonic() - start,
            message=f"{len(grew)} label sets grew: " + ", ".join(sorted(grew))[:600],
            problem=(f"no invalid records counted for kinds {sorted(missing)} (the counter "
                     f"grew by {sum(grew.values()):g} in all)") if missing else None))
    finally:
        clean_poison(client, keys)
    # The stand-ins leave the gateway's view once their heartbeat is older than the TTL.
    deadline = time.monotonic() + gone_within_s
    while True:
        ws = httpx.get(f"{t.base_url}/health", timeout=5).json()["workers"]
        if not any(w["model"] == "poison-model" for w in ws):
            break
        if time.monotonic() > deadline:
            out.append(Outcome("poisoned_redis", "stand-ins gone after cleanup", None,
                               gone_within_s, problem="poison stand-ins still listed"))
            break
        time.sleep(0.5)
    out.append(send_chat(t, "chat after the cleanup", cls="poisoned_redis"))
    return out


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def stop_tree(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def worker_tree(redis_url: str, worker_id: str | None = None) -> tuple[str, list[psutil.Process]]:
    """A stack worker's id and its processes (`beluga worker`, vLLM's server and engine),
    from its registry record's pid."""
    import redis as redis_lib

    from beluga.registry import load_worker, worker_pattern

    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    records = []
    for key in client.scan_iter(match=worker_pattern(PREFIX)):
        with contextlib.suppress(Exception):
            records.append(load_worker(client.get(key)))
    records = sorted((r for r in records if psutil.pid_exists(r.pid) and r.pid > 1),
                     key=lambda r: r.id)
    if worker_id is not None:
        records = [r for r in records if r.id == worker_id]
    if not records:
        raise RuntimeError("no stack worker found in the registry")
    return records[0].id, process_tree(records[0].pid)


def healthy_ids(base_url: str) -> set[str]:
    ws = httpx.get(f"{base_url}/health", timeout=5).json()["workers"]
    return {w["id"] for w in ws if w["healthy"]}


def stopped_worker(t: Target, redis_url: str, detect_within_s: float = 30.0,
                   requests: int = 6, window: bool = False) -> list[Outcome]:
    """One worker frozen (SIGSTOP to its whole process tree, SIGCONT in a finally): the
    gateway stops routing to it within `detect_within_s`, requests then succeed on the other
    worker within their bound; after SIGCONT it comes back. `window`: also send requests
    in the detection window (they may wait for the frozen worker: counted, not judged)."""
    out: list[Outcome] = []
    wid, procs = worker_tree(redis_url)
    others = healthy_ids(t.base_url) - {wid}
    if not others:
        return [Outcome("stopped_worker", "another healthy worker", None, 0,
                        problem="only one healthy worker: nothing to fail over to")]
    start = time.monotonic()
    window_results: list[Outcome] = []
    threads: list[threading.Thread] = []
    try:
        stop_tree(procs, signal.SIGSTOP)
        if window:
            def one(i: int) -> None:
                window_results.append(send_chat(t, f"chat in the detection window #{i}",
                                                cls="stopped_worker", bound_s=60))
            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(4)]
            for th in threads:
                th.start()
        while wid in healthy_ids(t.base_url) or any(
                w["id"] == wid and w["healthy"] for w in
                httpx.get(f"{t.base_url}/health", timeout=5).json()["workers"]):
            if time.monotonic() - start > detect_within_s:
                break
            time.sleep(0.2)
        took = time.monotonic() - start
        detected = wid not in healthy_ids(t.base_url)
        out.append(Outcome("stopped_worker", "frozen worker taken out of routing",
                           0 if detected else None, took,
                           message=f"after {took:.1f} s",
                           problem=None if detected else (
                               f"still routed to {detect_within_s:g} s after it froze")))
        for i in range(requests):
            o = send_chat(t, f"chat while a worker is frozen #{i}", cls="stopped_worker",
                          bound_s=30)
            if o.headers.get("x-beluga-worker") == wid and o.problem is None:
                o.problem = "served by the frozen worker?"
            out.append(o)
    finally:
        stop_tree(procs, signal.SIGCONT)
    for th in threads:
        th.join(120)
    for o in window_results:
        o.label += f" ({'waited for the frozen worker' if o.elapsed_s > 10 else 'served'})"
        o.problem = None if o.status == 200 else o.problem  # informational
        out.append(o)
    deadline = time.monotonic() + 60
    while wid not in healthy_ids(t.base_url):
        if time.monotonic() > deadline:
            out.append(Outcome("stopped_worker", "worker back after SIGCONT", None, 60,
                               problem="the worker did not come back within 60 s"))
            break
        time.sleep(0.3)
    out.append(send_chat(t, "chat after SIGCONT", cls="stopped_worker"))
    return out


def redis_pid(redis_url: str) -> int:
    port = urlsplit(redis_url).port or 6379
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "redis-server":
            with contextlib.suppress(psutil.Error):
                for c in p.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                        return p.pid
    raise RuntimeError(f"no redis-server listens on port {port}")


def stopped_redis(t: Target, redis_url: str, stop_s: float = 3.0, slow_s: float = 6.0,
                  requests_each: int = 4, long_stop_s: float = 0.0) -> list[Outcome]:
    """Redis frozen (SIGSTOP, SIGCONT in a finally) for `stop_s`, then slow (stopped 300 ms
    of every 500 ms for `slow_s`), then optionally frozen `long_stop_s` (past the workers'
    registry TTL): requests are served throughout and after, /health answers."""
    pid = redis_pid(redis_url)
    proc = psutil.Process(pid)
    out: list[Outcome] = []
    stop_flag = threading.Event()

    def flapping() -> None:
        while not stop_flag.is_set():
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.3)
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)

    def during(label: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end or i < requests_each:
            out.append(send_chat(t, f"{label} #{i}", cls="stopped_redis", bound_s=30))
            i += 1

    try:
        proc.send_signal(signal.SIGSTOP)
        during(f"chat with Redis frozen ({stop_s:g} s)", stop_s)
        proc.send_signal(signal.SIGCONT)
        flap = threading.Thread(target=flapping, daemon=True)
        flap.start()
        try:
            during("chat with Redis slow (stopped 300 ms of 500)", slow_s)
        finally:
            stop_flag.set()
            flap.join(5)
        proc.send_signal(signal.SIGCONT)
        if long_stop_s:
            proc.send_signal(signal.SIGSTOP)
            during(f"chat with Redis frozen {long_stop_s:g} s", long_stop_s)
            proc.send_signal(signal.SIGCONT)
            during("chat right after a long Redis freeze", 5)
    finally:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)
    out.append(send_chat(t, "chat after Redis came back", cls="stopped_redis"))
    return out


# -- /health and RSS, measured from another process --------------------------------------
PROBE = r"""
import http.client, os, sys, time
host, port, pid, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
interval = float(sys.argv[5])
out = open(path, "w", buffering=1)


def sched():
    # ns the gateway's main thread (its event loop) ran and waited for a CPU; ns each of its
    # other threads waited for one; ns this probe waited for one.
    run = wait = mine = 0
    others = {}
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait = (int(x) for x in f.read().split()[:2])
        for tid in os.listdir(f"/proc/{pid}/task"):
            if tid != str(pid):
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        others[tid] = int(f.read().split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        with open("/proc/self/schedstat") as f:
            mine = int(f.read().split()[1])
    except (OSError, ValueError):
        pass
    return run, wait, others, mine


conn = None
nxt = time.monotonic()
i = 0
while True:
    r0, w0, a0, m0 = sched() if pid else (0, 0, {}, 0)
    t0 = time.monotonic()
    status = 0
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        status = r.status
    except Exception:
        conn = None
    lat = time.monotonic() - t0
    r1, w1, a1, m1 = sched() if pid else (0, 0, {}, 0)
    other = max((a1[t] - a0.get(t, 0) for t in a1), default=0)
    out.write(f"h {t0:.6f} {lat:.6f} {status} {(r1 - r0) / 1e9:.6f} {(w1 - w0) / 1e9:.6f} "
              f"{other / 1e9:.6f} {(m1 - m0) / 1e9:.6f}\n")
    if pid and i % 4 == 0:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out.write(f"r {t0:.6f} {int(line.split()[1]) * 1024}\n")
        except OSError:
            out.write(f"r {t0:.6f} -1\n")
    i += 1
    nxt += interval
    time.sleep(max(0.0, nxt - time.monotonic()))
    if nxt < time.monotonic() - 1:
        nxt = time.monotonic()
"""


@dataclass
class HealthStats:
    """/health over a window. Each probe also says what happened meanwhile
    (/proc/*/schedstat): a probe is `starved` when, for at least half of its time, the
    gateway's event-loop thread waited for a CPU, or another gateway thread did (the one
    holding the GIL the loop waits for), or the probe itself did: the machine was short of
    cores (the workers' compute, the client). Otherwise a slow probe is the gateway's own
    stall: its loop `busy` running something else, or blocked. `own_p99_ms`/`own_max_ms`
    leave the starved probes out."""

    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    failed: int          # no answer, or not 200
    slow: int = 0        # probes over 100 ms
    busy: int = 0        # ... during which the loop thread mostly ran
    starved: int = 0     # ... during which it mostly waited for a CPU
    own_p99_ms: float = 0.0
    own_max_ms: float = 0.0

    def __str__(self) -> str:
        return (f"{self.n} probes, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
                f"max {self.max_ms:.1f} ms, {self.failed} failed; {self.slow} over 100 ms "
                f"(loop busy {self.busy}, starved of CPU {self.starved}); without the "
                f"starved: p99 {self.own_p99_ms:.1f} ms, max {self.own_max_ms:.1f} ms")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class HealthProbe:
    """GET /health every `interval_s` on one kept-alive connection, and the RSS of `pid`
    every 4th time, from a process of its own; `stats(t0, t1)` and `rss_max(t0, t1)` over
    any window of time.monotonic() (the same clock in both processes)."""

    def __init__(self, base_url: str, pid: int = 0, interval_s: float = 0.05) -> None:
        host, port = host_port(base_url)
        fd, self.path = tempfile.mkstemp(prefix="beluga-health-", suffix=".txt")
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, host, str(port), str(pid),
                                      self.path, str(interval_s)])

    def lines(self) -> Iterator[list[str]]:
        with open(self.path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and line.endswith("\n"):
                    yield parts

    def stats(self, t0: float = 0.0, t1: float = float("inf")) -> HealthStats:
        lat, own, failed, slow, busy, starved = [], [], 0, 0, 0, 0
        for parts in self.lines():
            if parts[0] == "h" and len(parts) >= 6 and t0 <= float(parts[1]) <= t1:
                ms = float(parts[2]) * 1000
                lat.append(ms)
                failed += parts[3] != "200"
                ran, waited = float(parts[4]) * 1000, float(parts[5]) * 1000
                others, mine = ((float(parts[6]) * 1000, float(parts[7]) * 1000)
                                if len(parts) >= 8 else (0.0, 0.0))
                if ms > 20 and max(waited, others, mine) >= ms / 2:
                    starved += ms > 100
                else:
                    own.append(ms)
                if ms > 100:
                    slow += 1
                    busy += ran >= ms / 2
        return HealthStats(len(lat), percentile(lat, 0.5), percentile(lat, 0.99),
                           max(lat, default=0.0), failed, slow, busy, starved,
                           percentile(own, 0.99), max(own, default=0.0))

    def rss_max(self, t0: float = 0.0, t1: float = float("inf")) -> int:
        return max((int(p[2]) for p in self.lines() if p[0] == "r" and t0 <= float(p[1]) <= t1),
                   default=0)

    def rss_series(self) -> list[tuple[float, int]]:
        return [(float(p[1]), int(p[2])) for p in self.lines() if p[0] == "r"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def gateway_pid(base_url: str) -> int | None:
    """The pid of the process listening on the gateway's port (a `beluga gateway`)."""
    _host, port = host_port(base_url)
    found = None
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "gateway" not in cmd:
            continue
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    return p.pid
    return found


def ask_paris(base_url: str, model: str, timeout_s: float = 60) -> tuple[bool, str]:
    """The stack still answers: "What is the capital of France?" (temperature 0, 8 tokens)
    names Paris."""
    try:
        r = httpx.post(f"{base_url}/v1/chat/completions", timeout=timeout_s, json={
            "model": model, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": QUESTION}]})
    except httpx.HTTPError as exc:
        return False, repr(exc)
    if r.status_code != 200:
        return False, f"{r.status_code}: {r.text[:300]}"
    text = r.json()["choices"][0]["message"]["content"] or ""
    return "Paris" in text, text


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    kinds = Counter(o.kind for o in outcomes if o.status is not None or o.problem)
    statuses = Counter(str(o.status) for o in outcomes)
    return {"requests": len(outcomes), "statuses": dict(sorted(statuses.items())),
            "kinds": dict(kinds), "max_s": max((o.elapsed_s for o in outcomes), default=0.0),
            "problems": [o for o in outcomes if o.problem]}


# -- a stack of one's own (the scripts, without --url) ------------------------------------
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct"


def _free_port(consecutive: int = 1) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        try:
            for port in range(base + 1, base + consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


@contextlib.contextmanager
def stack_at(url: str | None, redis_url: str | None) -> Iterator[tuple[str, str | None]]:
    """(gateway URL, Redis URL) of the running stack at `url`, or of an OwnStack started
    here (and stopped after) when `url` is None: the benchmarks' --url."""
    if url:
        yield url.rstrip("/"), redis_url
        return
    print("starting a stack (beluga up, default settings) ...", flush=True)
    stack = OwnStack()
    print(f"stack at {stack.base_url}, Redis {stack.redis_url}, log {stack.log}", flush=True)
    try:
        yield stack.base_url, stack.redis_url
    finally:
        stack.stop()
        print(f"stack stopped (its log: {stack.log})")


class OwnStack:
    """`beluga up` as `make run` starts it (Redis, two workers, the gateway; default
    settings), on free ports, with its state in a temporary folder: `base_url`,
    `redis_url`; `stop()` sends Ctrl-C and waits, then kills what is left."""

    def __init__(self, log_level: str = "INFO", env: dict[str, str] | None = None,
                 start_timeout_s: float = 900) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="beluga-hostile-"))
        gw, wk, rd = _free_port(), _free_port(2), _free_port()
        self.pool_path = Path(f"/dev/shm/beluga-hostile-{os.getpid()}.pool")
        self.pool_path.unlink(missing_ok=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
        full.update({"BELUGA_STATE_DIR": str(self.tmp), "BELUGA_MODEL": str(DEFAULT_MODEL),
                     "BELUGA_REDIS_URL": f"redis://127.0.0.1:{rd}/0",
                     "BELUGA_GATEWAY_HOST": "127.0.0.1", "BELUGA_GATEWAY_PORT": str(gw),
                     "BELUGA_WORKER_PORT": str(wk), "BELUGA_POOL_PATH": str(self.pool_path),
                     "BELUGA_POOL_SIZE_GIB": "1", **(env or {})})
        self.base_url = f"http://127.0.0.1:{gw}"
        self.redis_url = full["BELUGA_REDIS_URL"]
        self.log = self.tmp / "up.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "beluga_cli", "--log-level", log_level, "up"],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full,
                cwd=ROOT)
        deadline = time.monotonic() + start_timeout_s
        while b"Press Ctrl-C" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"beluga up did not become ready:\n{tail}")
            time.sleep(1)

    def stop(self) -> None:
        started = []
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            for p in started:  # nothing of it may stay frozen
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _gone, alive = psutil.wait_procs(started, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.pool_path.unlink(missing_ok=True)
