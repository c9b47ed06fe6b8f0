"""docker-compose.yml is valid and wires what the README promises (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                reason="Debian's docker-compose is not installed")


def compose_config(profiles: str, **variables: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BELUGA_", "HF_"))}
    env.update(variables, COMPOSE_PROFILES=profiles)
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    data = yaml.safe_load(out)
    assert isinstance(data, dict)
    return data


def test_compose_file_is_valid_and_complete() -> None:
    services = compose_config("gpu")["services"]
    assert {"redis", "gateway", "worker-0", "worker-1", "cpu-worker-0",
            "cpu-worker-1"} <= set(services)
    assert services["gateway"]["ports"][0]["target"] == 8000
    for name in ("worker-0", "worker-1"):
        svc = services[name]
        assert svc["profiles"] == ["gpu"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert svc["environment"]["BELUGA_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("cpu-worker-0", "cpu-worker-1"):
        assert services[name]["profiles"] == ["cpu"]


def test_every_beluga_variable_in_compose_is_a_setting() -> None:
    from beluga.settings import Settings

    known = {f"BELUGA_{n.upper()}" for n in Settings.model_fields}
    services = compose_config("gpu")["services"]
    used = {k for svc in services.values() for k in (svc.get("environment") or {})
            if k.startswith("BELUGA_")}
    assert used and used <= known, json.dumps(sorted(used - known))


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes, short ("src:dst:mode") or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1]))
        else:
            out.append((str(v.get("source")), str(v["target"])))
    return out


def test_the_pool_is_shared_and_the_monitoring_is_wired() -> None:
    config = compose_config("gpu")
    services = config["services"]
    pool_users = [n for n, s in services.items() if ("beluga-pool", "/pool") in mounts(s)]
    assert {"gateway", "worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1"} <= set(pool_users)
    volume = config["volumes"]["beluga-pool"]
    assert volume["driver_opts"]["type"] == "tmpfs"
    for name in ("worker-0", "cpu-worker-1"):
        assert services[name]["environment"]["BELUGA_POOL_PATH"] == "/pool/beluga.pool"
    prom = services["prometheus"]
    assert any(t == "/etc/prometheus/prometheus.yml" for _, t in mounts(prom))
    assert prom["depends_on"]["gateway"]["condition"] == "service_healthy"
    grafana = services["grafana"]
    targets = {t for _, t in mounts(grafana)}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards/beluga.json"} <= targets
    for name in ("redis", "gateway", "prometheus", "grafana", "worker-0", "cpu-worker-0"):
        assert services[name]["healthcheck"]["test"], name
    for source in (ROOT / "dashboards" / "prometheus.yml",
                   ROOT / "dashboards" / "grafana" / "provisioning",
                   ROOT / "dashboards" / "grafana" / "beluga.json"):
        assert source.exists(), source


def test_the_model_is_a_mounted_folder_or_a_name_the_same_for_gateway_and_workers() -> None:
    model_users = ("gateway", "worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1")
    folder = compose_config("gpu")["services"]
    for name in model_users:
        env = folder[name]["environment"]
        assert (env["BELUGA_MODEL"], env["BELUGA_SERVED_MODEL_NAME"]) == \
            ("/model", "smollm2-135m-instruct"), name
        assert {"/model", "/var/lib/beluga/hf"} <= {t for _, t in mounts(folder[name])}, name
        assert env["HF_HOME"] == "/var/lib/beluga/hf"
    by_name = compose_config("gpu", BELUGA_MODEL="Qwen/Qwen2.5-7B-Instruct",
                             BELUGA_SERVED_MODEL_NAME="qwen", HF_TOKEN="hf_x")["services"]
    for name in model_users:
        env = by_name[name]["environment"]
        assert (env["BELUGA_MODEL"], env["BELUGA_SERVED_MODEL_NAME"], env["HF_TOKEN"],
                env["HF_HUB_OFFLINE"]) == ("Qwen/Qwen2.5-7B-Instruct", "qwen", "hf_x", "0")
        assert ("hf-cache", "/var/lib/beluga/hf") in mounts(by_name[name])
    from beluga.settings import Settings
    assert Settings(model="Qwen/Qwen2.5-7B-Instruct").model_hub_id is not None


def test_devdax_override_passes_the_device_and_points_the_pool_at_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env.update(COMPOSE_PROFILES="gpu", BELUGA_POOL_DEVICE="/dev/dax0.0")
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "-f",
                          str(ROOT / "docker-compose.devdax.yml"), "config"], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout
    services = yaml.safe_load(out)["services"]
    for name in ("gateway", "worker-0", "worker-1"):
        devices = services[name]["devices"]
        assert any("/dev/dax0.0" in str(d) for d in devices), (name, devices)
    assert services["worker-0"]["environment"]["BELUGA_POOL_PATH"] == "/dev/dax0.0"


def test_what_the_readme_says_about_deploying_is_in_the_files() -> None:
    readme = (ROOT / "README.md").read_text()
    deploy = readme.split("## Deploy", 1)[1].split("\n## ", 1)[0]
    services = compose_config("gpu")["services"]
    for name in re.findall(r"`([a-z0-9-]+)` service", deploy):
        assert name in services, name
    published = {str(p["published"]) for s in services.values() for p in s.get("ports", [])}
    for port in re.findall(r":(\d{4})\b", deploy):
        assert port in published, port
    from beluga.settings import Settings
    known = {f"BELUGA_{n.upper()}" for n in Settings.model_fields}
    compose_text = (ROOT / "docker-compose.yml").read_text()
    for var in set(re.findall(r"\b(BELUGA_[A-Z_]+)\b", deploy)):
        assert var in known or var in compose_text, var
