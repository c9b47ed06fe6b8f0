from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from beluga.registry import check_worker_id, check_worker_url
from beluga.settings import Settings
from beluga_cli.cli import UP_FIELDS, build_parser, settings_from_args
from beluga_cli.up import settings_env

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_documented_stack() -> None:
    s = Settings()
    assert s.gateway_port == 8000
    assert s.num_workers == 2
    assert s.dtype == "auto" and s.enforce_eager
    assert s.model_path == Path(".beluga/models/SmolLM2-135M-Instruct")
    assert s.worker_url == "http://127.0.0.1:8100"
    assert s.resolved_worker_id == "127.0.0.1:8100"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELUGA_GATEWAY_PORT", "9001")
    monkeypatch.setenv("BELUGA_ENFORCE_EAGER", "false")
    s = Settings()
    assert s.gateway_port == 9001
    assert s.enforce_eager is False


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELUGA_GATEWAY_PORT", "9001")
    args = build_parser().parse_args(["up", "--gateway-port", "9100", "--no-enforce-eager",
                                      "--num-workers", "3"])
    s = settings_from_args(args, UP_FIELDS)
    assert (s.gateway_port, s.enforce_eager, s.num_workers) == (9100, False, 3)


@pytest.mark.parametrize(
    ("name", "value"),
    [("BELUGA_GATEWAY_PORT", "0"), ("BELUGA_GATEWAY_PORT", "http"),
     ("BELUGA_DTYPE", "int4"), ("BELUGA_REDIS_URL", "http://x"), ("BELUGA_NO_SUCH", "1"),
     ("BELUGA_KV_CACHE_SPACE_GIB", "-1")],
)
def test_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_the_model_is_a_folder_here_or_else_a_hub_id(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Settings(model=tmp_path)
    assert folder.model_hub_id is None and folder.model_ref == str(tmp_path)
    hub = Settings(model="HuggingFaceTB/SmolLM2-1.7B-Instruct")
    assert hub.model_hub_id == hub.model_ref == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert Settings(model="org/name").model_hub_id is None   # a folder here wins, as in vLLM
    for missing in ("./org/other", "/models/m", "a/b/c", "name"):
        s = Settings(model=missing)
        assert s.model_hub_id is None and s.model_ref == str(Path(missing))


def test_settings_survive_the_trip_to_child_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(gateway_port=9200, model=Path("/m"), enforce_eager=False,
                        vllm_extra_args="--seed 3", kv_cache_space_gib=3)
    for key, value in settings_env(original).items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


@pytest.mark.parametrize("argv", [["--help"], ["up", "--help"], ["gateway", "--help"],
                                  ["worker", "--help"], ["model", "prepare", "--help"]])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: beluga" in out


def test_flag_help_names_the_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--help"])
    assert "BELUGA_GATEWAY_PORT" in capsys.readouterr().out


@pytest.mark.parametrize("over", [{"worker_id": "a b"}, {"worker_id": "w\r\nX: 1"},
                                  {"worker_advertise_url": "http://h:1/path"},
                                  {"worker_advertise_url": "file:///etc/passwd"},
                                  {"max_num_seqs": 200_000}])
def test_a_worker_identity_the_registry_would_refuse_fails_at_start(
        over: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**over)


def test_an_ipv6_worker_host_makes_a_valid_url() -> None:
    assert Settings(worker_host="::1", worker_port=8100).worker_url == "http://[::1]:8100"


def test_a_worker_on_every_interface_is_named_after_its_host() -> None:
    s = Settings(worker_host="0.0.0.0", worker_port=8100)
    assert s.resolved_worker_id == f"{socket.gethostname()}:8100"
    assert s.worker_url.startswith("http://") and s.worker_url.endswith(":8100")
    assert "0.0.0.0" not in s.worker_url
    assert Settings(worker_host="0.0.0.0", worker_id="w-1").resolved_worker_id == "w-1"


def test_replicas_of_one_container_get_distinct_ids_and_urls() -> None:
    """Two processes with the same settings (a compose service's replicas: BELUGA_WORKER_HOST
    0.0.0.0, nothing else) in two UTS namespaces, as two containers are, with container-id
    host names."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is missing")
    code = ("from beluga.settings import Settings; s = Settings(); "
            "print(s.resolved_worker_id, s.worker_url)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env.update(PYTHONPATH=str(ROOT), BELUGA_WORKER_HOST="0.0.0.0", BELUGA_WORKER_PORT="8100")
    seen = []
    for name in ("3f2a9c1b7d0e", "9b81d2c4e6aa"):
        done = subprocess.run(["unshare", "--uts", "sh", "-c", f'hostname {name} && exec '
                               f'"{sys.executable}" -c "{code}"'], env=env,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0 and "hostname" in done.stderr + done.stdout:
            pytest.skip(f"cannot make a UTS namespace here: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        worker_id, url = done.stdout.split()
        assert worker_id == f"{name}:8100"
        check_worker_id(worker_id)
        check_worker_url(url)
        seen.append((worker_id, url))
    assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]


def test_naming_the_default_models_own_folder_still_prepares_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the compose stack does: BELUGA_MODEL names the default model's folder in the
    state dir, which its one-shot `model` service prepares (`beluga model prepare`)."""
    assert Settings(state_dir=tmp_path).serves_default_model
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert Settings(state_dir=tmp_path, model=str(folder)).serves_default_model
    monkeypatch.chdir(tmp_path)
    assert Settings(state_dir=Path("."), model=str(folder)).serves_default_model
    assert not Settings(state_dir=tmp_path, model=str(tmp_path / "models" / "Other")) \
        .serves_default_model
    assert not Settings(state_dir=tmp_path, model="HuggingFaceTB/SmolLM2-135M-Instruct") \
        .serves_default_model
