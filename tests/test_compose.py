"""docker-compose.yml is valid and wires what the README promises (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                reason="Debian's docker-compose is not installed")


def compose_config(profiles: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env["COMPOSE_PROFILES"] = profiles
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
