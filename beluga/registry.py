"""The worker registry record: what a worker publishes in Redis and the gateway reads.

One Redis string per worker, ``<prefix>:worker:<id>``, holding a JSON object with an explicit
``schema`` version and a TTL. Next to it, per worker, a hints record and a set of hint keys
(engine/hints.py).

Redis is untrusted input (DESIGN.md, "Trust boundaries"): anyone who can write to it can
write anything. Readers validate every field before use and skip what does not pass:

* worker URL: ``http``/``https``, an ASCII host name or IP literal, a port in 1-65535
  (explicit or the scheme's default), no userinfo, query or fragment, path empty or ``/``
  (normalized away), no whitespace or control character anywhere: the gateway writes the
  host into a raw HTTP request line (gateway/upstream.py), so nothing may inject a header;
* worker id: printable ASCII without spaces, 1-200 characters (it goes into the
  ``x-beluga-worker`` header and Prometheus labels); model name: printable, 1-256 characters,
  no control or separator characters;
* numbers: integers strictly typed (no floats, strings or booleans), capacity 1..100000,
  running and waiting 0..10^7, pid 0..2^22, block_tokens 1..1024, keys 0..10^7; timestamps
  finite, in 0..1e11 seconds since the epoch (1e11 is the year 5138: a heartbeat "from the
  future" must not keep a dead worker listed forever; 0 stays valid, it is "unknown");
* pool UUID: canonical lowercase text (``str(uuid.UUID(...))``); fingerprint: 64 lowercase
  hex characters;
* pool path: absolute, normalized (no ``.``/``..``/``//``), no control character, at most
  4096 characters, and inside one of the gateway's ``pool_search_dirs``. A bad pool path
  drops only the path (the record keeps routing, the pool is then looked for in the usual
  places only) and is counted as ``kind="hints", reason="pool_path"``;
* a value is read at most ``MAX_RECORD_BYTES`` long (a record is a few hundred bytes);
  JSON nested too deep, non-UTF-8 bytes, a key of another Redis type: all skipped.

`InvalidRecords` is what the gateway does with a refused record: log it once per (key,
reason), with bounded memory, and count it (a callback, the Prometheus counter
``beluga_gateway_registry_invalid_records_total{kind, reason}``); reasons are a bounded set
(`REASONS`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

MAX_RECORD_BYTES = 16384  # longest registry or hints value read (a record is ~300-5000 B)
MAX_TIMESTAMP = 1e11      # seconds since the epoch (year 5138): anything later is absurd

_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_URL_RE = re.compile(r"(?P<scheme>https?)://(?P<host>[^/:\[\]]+|\[[^\]/]*\])"
                     r"(?::(?P<port>[0-9]{1,5}))?/?")
_WORKER_ID_RE = re.compile(r"[\x21-\x7e]{1,200}")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
MAX_ADAPTERS = 64  # LoRA adapters one worker may advertise
_HINT_KEY_RE = re.compile(rb"[0-9a-f]{32}")


class InvalidRecord(ValueError):
    """A Redis value refused; `reason` is one of `REASONS` (a metric label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason if reason in REASONS else "other"
        self.detail = detail


# Hosts no worker is at, where a record naming one would send the worker credential and
# clients' prompts: cloud metadata services (by name; their addresses are link-local).
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com"})


def _not_a_worker_host(host: str) -> None:
    """ValueError for a host no worker can be at: unspecified, link-local (cloud metadata
    services), multicast or reserved addresses, and metadata service names."""
    if host.lower().rstrip(".") in METADATA_HOSTS:
        raise ValueError("a cloud metadata service, not a worker")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return  # a name
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_loopback:
        return
    if ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved:
        raise ValueError(f"{ip} is an unspecified, link-local, multicast or reserved "
                         "address, not a worker's")
    if isinstance(ip, ipaddress.IPv6Address) and ip in _AWS_METADATA_V6:
        raise ValueError(f"{ip} is a cloud metadata service, not a worker")


_AWS_METADATA_V6 = ipaddress.ip_network("fd00:ec2::/32")


def check_worker_url(url: str) -> str:
    """The URL without a trailing "/", or ValueError; see the module doc for the rules."""
    m = _URL_RE.fullmatch(url)
    if m is None:
        raise ValueError("not http(s)://host[:port] with nothing else")
    host = m["host"]
    if not _HOST_RE.fullmatch(host):
        raise ValueError("bad host")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("bad IPv6 literal") from None
    _not_a_worker_host(host.strip("[]"))
    if m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
        raise ValueError("port outside 1-65535")
    # Belt and braces: the standard parser must read the same host and port.
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if (parts.hostname is None or parts.hostname.lower() != host.strip("[]").lower()
            or port != int(m["port"] or port) or parts.username is not None):
        raise ValueError("ambiguous URL")
    return url.rstrip("/")


def check_worker_id(worker_id: str) -> str:
    """`worker_id` when it is printable ASCII without spaces, 1-200 characters (it goes into
    HTTP headers and Prometheus labels); else ValueError."""
    if not _WORKER_ID_RE.fullmatch(worker_id):
        raise ValueError("not 1-200 printable ASCII characters without spaces")
    return worker_id


def check_pool_path(path: str, allowed_dirs: str | Iterable[str]) -> str | None:
    """None when `path` may be attached, else why not (a few words): absolute, normalized,
    no control characters, strictly inside one of `allowed_dirs` (lexically; the gateway
    also checks where symbolic links lead before it opens anything)."""
    if (not path.startswith("/") or path.startswith("//") or not path.isprintable()
            or len(path) > 4096):
        return "not an absolute printable path"
    if posixpath.normpath(path) != path:
        return "not normalized"
    for d in pool_dirs(allowed_dirs):
        if path.startswith(d.rstrip("/") + "/"):
            return None
    return "outside pool_search_dirs"


def pool_dirs(dirs: str | Iterable[str]) -> tuple[str, ...]:
    """`pool_search_dirs` (a comma-separated setting or a list) as normalized absolute
    directories; anything else in it is ignored."""
    items = dirs.split(",") if isinstance(dirs, str) else dirs
    out = []
    for d in items:
        d = d.strip()
        if d.startswith("/") and d.isprintable():
            out.append(posixpath.normpath(d))
    return tuple(out)


def _timestamp(value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp outside 0..{MAX_TIMESTAMP:g}")
    return value


class WorkerRecord(BaseModel):
    """One worker as the registry knows it."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    schema_version: int = Field(SCHEMA_VERSION, alias="schema", ge=SCHEMA_VERSION,
                                le=SCHEMA_VERSION)
    id: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1, max_length=500)
    model: str = Field(min_length=1, max_length=256)
    capacity: int = Field(ge=1, le=100_000)
    pid: int = Field(ge=0, le=2**22)
    started_at: float = Field(allow_inf_nan=False)
    heartbeat_at: float = Field(allow_inf_nan=False)
    running: int = Field(0, ge=0, le=10**7)
    waiting: int = Field(0, ge=0, le=10**7)
    # LoRA adapters served beside `model`: requests name one as their model.
    adapters: list[str] = Field(default_factory=list, max_length=MAX_ADAPTERS)

    @field_validator("adapters")
    @classmethod
    def _check_adapter_names(cls, value: list[str]) -> list[str]:
        if not all(_ADAPTER_NAME_RE.fullmatch(n) for n in value) or len(set(value)) < len(value):
            raise ValueError("adapter names are distinct, 1-100 letters, digits, '.', '_' "
                             "or '-'")
        return value

    def serves(self, model: str) -> bool:
        return model == self.model or model in self.adapters

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _WORKER_ID_RE.fullmatch(value):
            raise ValueError("worker id must be printable ASCII without spaces")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_worker_url(value)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not value.isprintable() or value.strip() != value:
            raise ValueError("model name must be printable, without surrounding spaces")
        return value

    @field_validator("started_at", "heartbeat_at")
    @classmethod
    def _check_time(cls, value: float) -> float:
        return _timestamp(value)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def worker_pattern(prefix: str) -> str:
    return f"{prefix}:worker:*"


def _load_object(raw: object, schema: int) -> dict[str, Any]:
    """The JSON object of a Redis value of the expected schema, or InvalidRecord."""
    if not isinstance(raw, bytes | str):
        raise InvalidRecord("wrong_type", type(raw).__name__)
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecord("too_large", f"over {MAX_RECORD_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # incl. UnicodeDecodeError, deep nesting
        raise InvalidRecord("not_json", type(exc).__name__) from None
    if not isinstance(data, dict):
        raise InvalidRecord("not_object", type(data).__name__)
    if data.get("schema") != schema or type(data.get("schema")) is not int:
        raise InvalidRecord("schema", "unknown schema version")
    return data


def _refused(exc: ValidationError) -> InvalidRecord:
    err = exc.errors(include_url=False, include_input=False)[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    return InvalidRecord(field if field in REASONS else "field", f"{field}: {err['msg']}")


def load_worker(raw: object) -> WorkerRecord:
    """The worker record in one Redis value, or InvalidRecord saying why not."""
    data = _load_object(raw, SCHEMA_VERSION)
    try:
        return WorkerRecord.model_validate(data)
    except ValidationError as exc:
        raise _refused(exc) from None


def parse_record(raw: bytes | str) -> WorkerRecord | None:
    """Decode one registry value; None (and a debug log) for anything malformed or foreign."""
    try:
        return load_worker(raw)
    except InvalidRecord as exc:
        logger.debug("skipping registry record (%s)", exc.reason)
        return None


# -- routing hints: which blocks a worker holds in its own KV cache ----------------------
HINTS_SCHEMA_VERSION = 1
HINT_KEY_HEX = 32  # the first 16 bytes of a block key: plenty for a routing hint


class HintsRecord(BaseModel):
    """What a worker publishes next to its block-key set: how to read that set."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    schema_version: int = Field(HINTS_SCHEMA_VERSION, alias="schema",
                                ge=HINTS_SCHEMA_VERSION, le=HINTS_SCHEMA_VERSION)
    worker_id: str = Field(min_length=1, max_length=200)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")  # model fingerprint of the keys
    block_tokens: int = Field(ge=1, le=1024)
    pool_uuid: str | None = None  # the pool this worker shares through, if any
    pool_path: str | None = Field(None, max_length=4096)  # where that pool is mapped there
    keys: int = Field(ge=0, le=10**7)  # how many keys the set holds
    updated_at: float = Field(allow_inf_nan=False)
    # LoRA adapters served beside the model: name -> digest of its files (kvpool.keys):
    # what a gateway keys an adapter's prompts with.
    adapters: dict[str, str] = Field(default_factory=dict, max_length=MAX_ADAPTERS)

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if not _ADAPTER_NAME_RE.fullmatch(name):
                raise ValueError("adapter names are 1-100 letters, digits, '.', '_' or '-'")
            if not _HEX64_RE.fullmatch(digest):
                raise ValueError("an adapter digest is 64 lowercase hex characters")
        return value

    @field_validator("worker_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _WORKER_ID_RE.fullmatch(value):
            raise ValueError("worker id must be printable ASCII without spaces")
        return value

    @field_validator("fingerprint")
    @classmethod
    def _check_fingerprint(cls, value: str) -> str:
        if not _HEX64_RE.fullmatch(value):  # `pattern` alone lets a trailing "\n" through
            raise ValueError("fingerprint must be 64 lowercase hex characters")
        return value

    @field_validator("pool_uuid")
    @classmethod
    def _check_uuid(cls, value: str | None) -> str | None:
        if value is not None and not _UUID_RE.fullmatch(value):
            raise ValueError("pool UUID must be canonical lowercase UUID text")
        return value

    @field_validator("pool_path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is not None and (why := check_pool_path(value, ["/"])) is not None:
            raise ValueError(f"pool path {why}")
        return value

    @field_validator("updated_at")
    @classmethod
    def _check_time(cls, value: float) -> float:
        return _timestamp(value)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def hints_key(prefix: str, worker_id: str) -> str:
    """JSON HintsRecord of one worker."""
    return f"{prefix}:hints:{worker_id}"


def hint_blocks_key(prefix: str, worker_id: str) -> str:
    """Redis set of hint keys (hex of the first 16 bytes of each block key)."""
    return f"{prefix}:hints:{worker_id}:blocks"


def hint_key(block_key: bytes) -> str:
    return block_key.hex()[:HINT_KEY_HEX]


def load_hints(raw: object, allowed_dirs: str | Iterable[str] = ("/",)
               ) -> tuple[HintsRecord, str | None]:
    """The hints record in one Redis value, or InvalidRecord; with it, why its pool path
    was dropped (None: kept or absent). A bad pool path does not refuse the record: only
    the path goes (the hints still route; the pool is looked for in the usual places)."""
    data = _load_object(raw, HINTS_SCHEMA_VERSION)
    dropped: str | None = None
    path = data.get("pool_path")
    if path is not None:
        why = (check_pool_path(path, allowed_dirs) if isinstance(path, str)
               else "not a string")
        if why is not None:
            data = {**data, "pool_path": None}
            dropped = why
    try:
        return HintsRecord.model_validate(data), dropped
    except ValidationError as exc:
        raise _refused(exc) from None


def parse_hints(raw: bytes | str) -> HintsRecord | None:
    try:
        return load_hints(raw)[0]
    except InvalidRecord:
        logger.debug("skipping malformed hints record")
        return None


def valid_hint_keys(members: Iterable[object]) -> tuple[frozenset[str], int]:
    """The well-formed hint keys among a set's members (exactly 32 lowercase hex
    characters) and how many others there were."""
    good: set[str] = set()
    bad = 0
    for m in members:
        if isinstance(m, str):
            m = m.encode("utf-8", "replace")
        if isinstance(m, bytes) and _HINT_KEY_RE.fullmatch(m):
            good.add(m.decode("ascii"))
        else:
            bad += 1
    return frozenset(good), bad


def is_wrong_type(answer: object) -> bool:
    """Whether a Redis pipeline answer is its WRONGTYPE error: a key of another type where a
    record should be (a bad record, not Redis failing)."""
    return isinstance(answer, Exception) and str(answer).startswith("WRONGTYPE")


def raise_failures(answers: Iterable[object]) -> None:
    """Raise the first error among pipeline answers (read with raise_on_error=False) that is
    not WRONGTYPE: NOAUTH, LOADING, OOM, ... mean Redis is failing, not that a record is bad."""
    for answer in answers:
        if isinstance(answer, Exception) and not is_wrong_type(answer):
            raise answer


# -- what readers do with a refused record -------------------------------------------------
KINDS = ("worker", "hints", "hint_keys")
REASONS = frozenset({
    # the value as a whole
    "wrong_type", "too_large", "not_json", "not_object", "schema", "field", "key_mismatch",
    "too_many", "error", "other",
    # one field (WorkerRecord, HintsRecord)
    "id", "url", "model", "capacity", "pid", "started_at", "heartbeat_at", "running",
    "waiting", "worker_id", "fingerprint", "block_tokens", "pool_uuid", "pool_path", "keys",
    "adapters",
    "updated_at",
    # hint-key set members
    "hint_key",
})


def _shown(key: object) -> str:
    """A Redis key, safe to log: repr, at most 120 characters."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    text = repr(key)
    return text if len(text) <= 120 else text[:117] + "..."


class InvalidRecords:
    """Refused Redis records: each (key, reason) is logged once (the first `remember` of
    them; after that, one line says the rest are only counted), and every refusal calls
    `count(kind, reason)` (the gateway's Prometheus counter; set it after construction)."""

    def __init__(self, count: Callable[[str, str], None] | None = None,
                 remember: int = 4096) -> None:
        self.count = count
        self._logged: set[tuple[str, str, str]] = set()
        self._remember = remember
        self._full_noted = False

    def report(self, kind: str, key: object, reason: str, detail: str = "",
               action: str = "skipped", exc: BaseException | None = None) -> None:
        """Count one refusal; log it unless this (kind, key, reason) was logged before.
        `exc`: an unexpected exception, logged with its traceback (once)."""
        if reason not in REASONS:
            reason = "other"
        if self.count is not None:
            try:
                self.count(kind, reason)
            except Exception:  # a metrics bug must not stop a refresh
                logger.exception("counting an invalid registry record failed")
        shown = _shown(key)
        mark = (kind, shown, reason)
        if mark in self._logged:
            return
        if len(self._logged) >= self._remember:
            if not self._full_noted:
                self._full_noted = True
                logger.warning("more than %d distinct invalid Redis records; further ones "
                               "are counted (beluga_gateway_registry_invalid_records_total) "
                               "but not logged", self._remember)
            return
        self._logged.add(mark)
        logger.warning("invalid %s record in Redis at %s %s (%s%s)", kind, shown, action,
                       reason, f": {detail[:200]!r}" if detail else "", exc_info=exc)

    def refused(self, kind: str, key: object, exc: InvalidRecord) -> None:
        self.report(kind, key, exc.reason, exc.detail)


def redacted_url(url: str) -> str:
    """`url` fit for a log line: the password (userinfo or a `password` query parameter)
    replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{hostport}"
        query = parts.query
        if query:
            pairs: Sequence[tuple[str, str]] = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if "password" in k.lower() else v) for k, v in pairs],
                              quote_via=quote, safe="/*")
        if netloc == parts.netloc and query == parts.query:
            return url
        return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
                + (f"#{parts.fragment}" if parts.fragment else ""))
    except ValueError:
        return "<unparsable URL>"
