from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from beluga.settings import Settings
from engine.connector import ConnectorConfig
from engine.worker import (
    Worker,
    loggable,
    parse_load,
    resolve_dtype,
    vllm_command,
    vllm_env,
)

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
"""


def test_command_runs_the_openai_server_module_with_the_settings() -> None:
    s = Settings(model=Path("/models/m"), worker_port=8123, max_num_seqs=7,
                 vllm_extra_args="--seed 5 --block-size 16")
    cmd = vllm_command(s, python="/py")
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    args = " ".join(cmd)
    for part in ("--model /models/m", "--port 8123", "--max-num-seqs 7", "--dtype ",
                 "--enforce-eager", "--served-model-name smollm2-135m-instruct",
                 "--seed 5 --block-size 16"):
        assert part in args


ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(("cpuinfo", "expected"), [
    (ZEN3, "float32"), (ZEN4, "bfloat16"), (GRAVITON3, "bfloat16"), ("", "float32"),
])
def test_auto_dtype_on_a_cpu_is_bf16_only_where_the_cores_compute_it(
        tmp_path: Path, cpuinfo: str, expected: str) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    assert resolve_dtype("auto", cuda=False, cpuinfo_path=str(info)) == expected


def test_an_explicit_dtype_and_cuda_auto_are_passed_as_they_are(tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    assert resolve_dtype("bfloat16", cuda=False, cpuinfo_path=missing) == "bfloat16"
    assert resolve_dtype("float16", cuda=True) == "float16"
    assert resolve_dtype("auto", cuda=True) == "auto"
    assert resolve_dtype("auto", cuda=False, cpuinfo_path=missing) == "float32"


def test_a_hub_id_is_passed_to_vllm_to_download() -> None:
    cmd = vllm_command(Settings(model="HuggingFaceTB/SmolLM2-1.7B-Instruct"))
    assert cmd[cmd.index("--model") + 1] == "HuggingFaceTB/SmolLM2-1.7B-Instruct"


def test_eager_can_be_switched_off() -> None:
    assert "--enforce-eager" not in vllm_command(Settings(enforce_eager=False))


def test_tool_calls_are_on_with_the_chosen_parser_or_off() -> None:
    args = " ".join(vllm_command(Settings(tool_call_parser="llama3_json")))
    assert "--enable-auto-tool-choice --tool-call-parser llama3_json" in args
    off = vllm_command(Settings(tool_call_parser=""))
    assert "--enable-auto-tool-choice" not in off and "--tool-call-parser" not in off


def test_cpu_kv_space_is_capped_and_the_hub_is_never_called() -> None:
    env = vllm_env(Settings(kv_cache_space_gib=2))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # the same thread layout with and without the connector (same arithmetic)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_a_model_by_name_may_be_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    env = vllm_env(Settings(model="HuggingFaceTB/SmolLM2-1.7B-Instruct"))
    assert "HF_HUB_OFFLINE" not in env and "TRANSFORMERS_OFFLINE" not in env


def test_load_is_read_from_vllm_metrics() -> None:
    assert parse_load(VLLM_METRICS) == (3, 2)
    two_engines = VLLM_METRICS.replace(
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0')
    assert parse_load(two_engines) == (7, 2)
    assert parse_load("") == (0, 0)


def test_the_connector_is_configured_by_default_and_can_be_switched_off() -> None:
    s = Settings(worker_port=8123, pool_size_gib=2, served_model_name="my/model")
    cmd = vllm_command(s)
    cfg = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert cfg["kv_connector"] == "BelugaConnector"
    assert cfg["kv_connector_module_path"] == "engine.connector"
    assert cfg["kv_load_failure_policy"] == "recompute"
    extra = cfg["kv_connector_extra_config"]
    assert extra["pool_path"] == "/dev/shm/beluga-my_model.pool"
    assert extra["pool_size_gib"] == 2 and extra["worker_id"] == s.resolved_worker_id
    ConnectorConfig.model_validate(extra)  # what the connector will accept
    assert "--kv-transfer-config" not in vllm_command(Settings(pool=False))


def test_the_redis_url_reaches_the_hint_publisher_in_the_environment_not_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(redis_url="redis://:hunter2@10.0.0.5:6379/0")
    assert not any("hunter2" in arg for arg in vllm_command(s))
    env = vllm_env(s)
    assert env["BELUGA_REDIS_URL"] == s.redis_url
    for name, value in env.items():
        if name.startswith("BELUGA_"):
            monkeypatch.setenv(name, value)
    assert Settings().redis_url == s.redis_url  # as the middleware in vLLM reads it


def test_every_worker_publishes_its_cache_from_vllms_kv_events(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pool or not: vLLM publishes its KV events on sockets in a private folder, and the
    local-cache middleware in its API server, configured through the environment, turns
    them into this worker's hints; usage reports cached tokens (the gateway's check)."""
    for pool in (True, False):
        s = Settings(pool=pool, kv_events_dir=tmp_path, worker_id="w-7",
                     lora_modules="sql=/a/sql, chat=/b/chat", max_hint_keys=99)
        cmd = vllm_command(s, python="/py")
        cfg = json.loads(cmd[cmd.index("--kv-events-config") + 1])
        assert cfg == {"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": f"ipc://{tmp_path}/events",
                       "replay_endpoint": f"ipc://{tmp_path}/replay", "topic": "beluga"}
        middlewares = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--middleware"]
        assert "engine.local_cache.LocalCacheMiddleware" in middlewares
        assert "--enable-prompt-tokens-details" in cmd
        at = cmd.index("--lora-modules")
        assert "--enable-lora" in cmd and cmd[at + 1:at + 3] == ["sql=/a/sql", "chat=/b/chat"]
        env = vllm_env(s)
        for name, value in env.items():
            if name.startswith("BELUGA_"):
                monkeypatch.setenv(name, value)
        child = Settings()
        assert child.kv_events_endpoints == s.kv_events_endpoints
        assert child.resolved_worker_id == "w-7" and child.max_hint_keys == 99
        assert child.lora_adapters == {"sql": Path("/a/sql"), "chat": Path("/b/chat")}
    assert "--kv-events-config" not in vllm_command(Settings(kv_events_dir=None), python="/py")


def test_a_worker_makes_and_removes_a_private_folder_for_the_event_sockets() -> None:
    w = Worker(Settings())
    folder = w.settings.kv_events_dir
    assert folder is not None and folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
    assert len(w.settings.kv_events_endpoints[0]) < 100  # type: ignore[index]  # AF_UNIX
    w.cleanup()
    assert not folder.exists()


@pytest.mark.parametrize("value", ["sql", "=x", "sql=", "a b=/x", "sql=/a,sql=/b",
                                   "smollm2-135m-instruct=/x"])
def test_malformed_lora_modules_are_refused_at_start(value: str) -> None:
    with pytest.raises(ValueError):
        Settings(lora_modules=value)


def test_block_size_is_32_on_cpu_vllms_own_on_cuda_or_as_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.worker as worker

    def block(cmd: list[str]) -> str | None:
        return cmd[cmd.index("--block-size") + 1] if "--block-size" in cmd else None

    monkeypatch.setattr(worker, "cuda_available", lambda: False)
    assert block(vllm_command(Settings())) == "32"
    assert block(vllm_command(Settings(block_size=128))) == "128"
    monkeypatch.setattr(worker, "cuda_available", lambda: True)
    assert block(vllm_command(Settings())) is None
    assert block(vllm_command(Settings(block_size=64))) == "64"
    with pytest.raises(ValueError):
        Settings(block_size=0)


def test_the_pool_lookup_endpoint_is_mounted_with_the_workers_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(pool_path=Path("/dev/shm/odd.pool"), pool_coherence="flush")
    cmd = vllm_command(s, python="/py")
    assert cmd[cmd.index("--middleware") + 1] == \
        "engine.pool_lookup_endpoint.PoolLookupMiddleware"
    env = vllm_env(s)
    assert env["BELUGA_POOL_PATH"] == "/dev/shm/odd.pool"
    # What the endpoint, inside vLLM's API server, reads back through Settings.
    for name in ("BELUGA_POOL_PATH", "BELUGA_POOL_COHERENCE"):
        monkeypatch.setenv(name, env[name])
    child = Settings()
    assert child.resolved_pool_path == Path("/dev/shm/odd.pool")
    assert child.pool_coherence == "flush"
    cmd = vllm_command(Settings(pool=False), python="/py")
    assert "engine.pool_lookup_endpoint.PoolLookupMiddleware" not in cmd


def test_the_worker_credential_reaches_vllm_in_its_environment_never_its_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = "k3y-" + "x" * 40
    s = Settings(worker_api_key=key)
    cmd = vllm_command(s, python="/py")
    assert not any(key in arg for arg in cmd) and "--api-key" not in cmd
    env = vllm_env(s)
    assert env["VLLM_API_KEY"] == key           # vLLM's own check on /v1
    assert env["BELUGA_WORKER_API_KEY"] == key  # the middleware's, on everything else
    assert cmd[cmd.index("--middleware") + 1] == \
        "engine.pool_lookup_endpoint.PoolLookupMiddleware"
    # What the middleware, inside vLLM's API server, reads back through Settings.
    for name in ("BELUGA_WORKER_API_KEY", "BELUGA_POOL", "BELUGA_POOL_PATH"):
        monkeypatch.setenv(name, env[name])
    assert Settings().worker_api_key == key and Settings().pool


def test_without_a_pool_the_credential_is_still_checked() -> None:
    s = Settings(pool=False, worker_api_key="k")
    cmd = vllm_command(s, python="/py")
    assert "--middleware" in cmd and "--kv-transfer-config" not in cmd
    assert vllm_env(s)["BELUGA_POOL"] == "false"


def test_without_a_credential_none_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "from-somewhere-else")
    env = vllm_env(Settings())
    assert "VLLM_API_KEY" not in env and "BELUGA_WORKER_API_KEY" not in env


def test_a_logged_command_hides_an_api_key_given_in_the_extra_args() -> None:
    cmd = vllm_command(Settings(vllm_extra_args="--api-key abc --seed 1 --api-key=def"))
    shown = loggable(cmd)
    assert "abc" not in shown and "def" not in shown
    assert "--api-key '***'" in shown and "--api-key=***" in shown and "--seed 1" in shown


class FakeRedis:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def set(self, key: str, value: str, ex: int) -> None:
        self.events.append("register")

    def delete(self, key: str) -> None:
        self.events.append("unregister")


class FakeVllm:
    """A vLLM process that is healthy and running until it gets SIGTERM."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.events.append(f"vllm {signal.Signals(sig).name}")
        self.returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_a_stopping_worker_unregisters_before_it_stops_vllm(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.worker as worker_mod

    events: list[str] = []
    w = Worker(Settings(heartbeat_interval_s=0.01))
    w.redis = FakeRedis(events)  # type: ignore[assignment]

    def start_vllm() -> None:
        w.proc = FakeVllm(events)  # type: ignore[assignment]

    monkeypatch.setattr(w, "start_vllm", start_vllm)
    monkeypatch.setattr(w, "wait_healthy", lambda _client: True)

    def load(_client: object, _url: str) -> tuple[int, int]:
        if events.count("register") >= 2:
            w.stop_event.set()  # what SIGTERM does (run_worker's handler)
        return 0, 0

    monkeypatch.setattr(worker_mod, "read_load", load)
    assert w.run() == 0
    assert events[-2:] == ["unregister", "vllm SIGTERM"], events


def test_the_lookup_endpoints_lock_timeout_reaches_vllms_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = vllm_env(Settings(pool_lock_timeout_s=0.2))
    assert env["BELUGA_POOL_LOCK_TIMEOUT_S"] == "0.2"
    monkeypatch.setenv("BELUGA_POOL_LOCK_TIMEOUT_S", env["BELUGA_POOL_LOCK_TIMEOUT_S"])
    assert Settings().pool_lock_timeout_s == 0.2  # as the endpoint reads it
    assert Settings.model_fields["pool_lock_timeout_s"].default == 0.05
