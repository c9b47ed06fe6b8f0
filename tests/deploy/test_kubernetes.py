"""deploy/kubernetes/beluga: every variant renders with Helm, every object validates against
the Kubernetes API schema of named releases (kubernetes-validate, offline), and the objects
fit together: selectors, ports, Secrets and ConfigMaps, the settings each container gets."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    DEPLOY,
    HELM_COMMIT,
    HELM_VERSION,
    NAMESPACE,
    ROOT,
    VARIANTS,
    Obj,
    Variant,
    by_kind,
    component,
    containers,
    expand,
    helm,
    named,
    pod_spec,
    quantity,
    rendered,
    secret_data,
    selects,
    template,
    workloads,
)

# The oldest release the chart supports (Chart.yaml's kubeVersion) and the one the pinned
# helm and kubectl were built for.
KUBERNETES_RELEASES = ("1.29.0", "1.35.0")
SERVICE_MONITOR_SCHEMA = Path(__file__).with_name("servicemonitor-v1.schema.json")
BY_NAME = {v.name: v for v in VARIANTS}
POD_IP = "10.244.3.17"

variants = pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)


def test_helm_is_the_pinned_official_build() -> None:
    out = helm("version", "--template", "{{.Version}} {{.GitCommit}} {{.GitTreeState}}")
    assert out.stdout.split() == [HELM_VERSION, HELM_COMMIT, "clean"]
    assert f"HELM_VERSION={HELM_VERSION}" in (DEPLOY / "tools" / "install-helm.sh").read_text()


@variants
def test_helm_lint_strict_and_notes(variant: Variant) -> None:
    out = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *variant.args,
               check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    # NOTES.txt, which `helm template` leaves out: what to label, how to reach the gateway
    out = helm("install", variant.release, str(CHART), "--dry-run=client", "--namespace",
               NAMESPACE, *variant.args)
    notes = out.stdout.split("NOTES:\n", 1)[1]
    for sts in by_kind(rendered(variant), "StatefulSet"):
        group = sts["metadata"]["labels"]["beluga/worker-group"]
        assert f"kubectl label node <node> beluga/kv-pool={group}\n" in notes, notes
    assert f"port-forward svc/{variant.fullname}-gateway 8000:8000" in notes, notes


@variants
def test_every_object_validates_against_the_kubernetes_api_schema(variant: Variant) -> None:
    monitor_schema = json.loads(SERVICE_MONITOR_SCHEMA.read_text())
    objs = rendered(variant)
    assert {"Deployment", "StatefulSet", "Service", "Secret"} <= {o["kind"] for o in objs}
    for obj in objs:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            jsonschema.Draft7Validator(monitor_schema).validate(obj)
            continue
        for release in KUBERNETES_RELEASES:
            try:  # strict: unknown fields are errors too
                kubernetes_validate.validate(obj, release, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                raise AssertionError(f"{what} against {release}: {path}: {exc.message}") \
                    from None
        assert obj["metadata"].get("namespace") in (None, NAMESPACE), what


def test_the_validators_catch_mistakes() -> None:
    """The schemas in use do refuse a wrong object (strictness is not silently off)."""
    deployment = json.loads(json.dumps(named(rendered(VARIANTS[0]), "Deployment",
                                             "beluga-gateway")))
    pod_spec(deployment)["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_RELEASES[0], strict=True)
    monitors = by_kind(rendered(BY_NAME["operator-monitoring"]), "ServiceMonitor")
    assert len(monitors) == 2
    bad = json.loads(json.dumps(monitors[0]))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads(SERVICE_MONITOR_SCHEMA.read_text())).validate(bad)


def external_secret_keys(variant: Variant) -> dict[str, tuple[str, ...]]:
    return dict(variant.external_secrets)


def check_reference(objs: tuple[Obj, ...], variant: Variant, kind: str, name: str,
                    key: str | None, where: str) -> None:
    if kind == "Secret" and name in external_secret_keys(variant):
        assert key is None or key in external_secret_keys(variant)[name], (where, name, key)
        return
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    assert found, f"{where}: {kind} {name} is not in the release"
    if key is not None:
        keys = set(found[0].get("data") or {}) | set(found[0].get("stringData") or {})
        assert key in keys, f"{where}: {kind} {name} has no key {key}"


@variants
def test_cross_references(variant: Variant) -> None:
    objs = rendered(variant)
    loads = workloads(objs)
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
                  for w in loads}
    for w in loads:
        name = w["metadata"]["name"]
        assert selects(w["spec"]["selector"]["matchLabels"], pod_labels[name]), name
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert len(volumes) == len(spec.get("volumes", [])), name
        for pull in spec.get("imagePullSecrets", []):
            check_reference(objs, variant, "Secret", pull["name"], None, name)
        for vol in volumes.values():
            if "secret" in vol:
                for item in vol["secret"].get("items", [{"key": None}]):
                    check_reference(objs, variant, "Secret", vol["secret"]["secretName"],
                                    item["key"], f"{name} volume {vol['name']}")
            if "configMap" in vol:
                check_reference(objs, variant, "ConfigMap", vol["configMap"]["name"], None,
                                f"{name} volume {vol['name']}")
        for term in (spec.get("affinity", {}).get("podAntiAffinity", {})
                     .get("preferredDuringSchedulingIgnoredDuringExecution", [])):
            selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
            assert selects(selector, pod_labels[name]), name
        for c in containers(w):
            where = f"{name}/{c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (where, mount["name"])
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports or port in ports.values(), (where, probe)
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), (where, "duplicate env")
            defined: set[str] = set()
            for e in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                    assert ref in defined, f"{where}: {e['name']} uses $({ref}) before it is set"
                defined.add(e["name"])
                source = e.get("valueFrom", {})
                for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if field in source and not source[field].get("optional"):
                        check_reference(objs, variant, kind, source[field]["name"],
                                        source[field]["key"], f"{where} env {e['name']}")
            for e in c.get("envFrom", []):
                for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if field in e:
                        check_reference(objs, variant, kind, e[field]["name"], None, where)

    services = by_kind(objs, "Service")
    for svc in services:
        sname = svc["metadata"]["name"]
        backing = [w for w in loads if selects(svc["spec"]["selector"],
                                               pod_labels[w["metadata"]["name"]])]
        assert backing, f"Service {sname} selects no pods"
        for w in backing:
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                exposed = [(p["name"], p["containerPort"]) for c in containers(w, init=False)
                           for p in c.get("ports", [])]
                assert any(target in pair for pair in exposed), (sname, target, exposed)
    for sts in by_kind(objs, "StatefulSet"):
        governing = named(objs, "Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"
        assert selects(governing["spec"]["selector"],
                       pod_labels[sts["metadata"]["name"]])
    for pdb in by_kind(objs, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], labels)
                   for labels in pod_labels.values()), pdb["metadata"]["name"]
    for monitor in by_kind(objs, "ServiceMonitor"):
        matched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"],
                                                  s["metadata"]["labels"])]
        assert len(matched) == 1, monitor["metadata"]["name"]
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}


def settings_env(objs: tuple[Obj, ...], variant: Variant, workload: Obj,
                 container: Obj) -> dict[str, str]:
    """The environment Kubernetes would give `container`: literal values, Secret keys (the
    rendered values; stand-ins for the user's own Secret), the downward API, $(VAR)s."""
    pod = workload["metadata"]["name"] + ("-0" if workload["kind"] == "StatefulSet" else "-x1")
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        source = e["valueFrom"]
        if "fieldRef" in source:
            env[e["name"]] = {"metadata.name": pod, "status.podIP": POD_IP}[
                source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["name"] in external_secret_keys(variant):
                env[e["name"]] = {"api-keys": "k1:tenant1"}.get(ref["key"], "stand-in-" * 4)
            else:
                env[e["name"]] = secret_data(objs, ref["name"])[ref["key"]]
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def beluga_containers(objs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    return [(w, c) for w in workloads(objs) for c in containers(w)
            if c.get("args", [""])[0] in ("gateway", "worker", "model")]


@variants
def test_beluga_accepts_the_settings_of_every_container(
        variant: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Beluga container's BELUGA_* variables are settings that beluga/settings.py
    accepts, and they say what the rest of the release assumes."""
    from beluga.settings import Settings

    objs = rendered(variant)
    found = set()
    for workload, container in beluga_containers(objs):
        env = settings_env(objs, variant, workload, container)
        for name in [k for k in os.environ if k.startswith("BELUGA_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("BELUGA_"):
                monkeypatch.setenv(name, value)
        settings = Settings()  # raises for a misspelt variable or a bad value
        where = f"{workload['metadata']['name']}/{container['name']}"
        role = container["args"][0]
        found.add(role)
        assert settings.state_dir == Path("/var/lib/beluga"), where
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert "/var/lib/beluga" in mounts, where
        if role == "model":
            assert settings.model is None, where  # the default model, into the state volume
            continue
        assert settings.served_model_name == "smollm2-135m-instruct" or \
            "model.source=hub" in variant.args, where
        source = next((a.split("=", 1)[1] for a in variant.args
                       if a.startswith("model.source=")), "default")
        if source == "default":
            assert settings.model_path == settings.models_dir / "SmolLM2-135M-Instruct"
            assert any(c["args"] == ["model", "prepare"] for c in
                       pod_spec(workload).get("initContainers", [])), where
        elif source == "hub":
            assert settings.model_hub_id == "Qwen/Qwen2.5-7B-Instruct", where
            assert env["HF_HUB_OFFLINE"] == "0"
        else:
            assert mounts["/model"]["readOnly"] and settings.model == "/model", where
        if "redis.enabled=false" in variant.args:
            assert settings.redis_url == "redis://:hunter2@redis.infra:6379/0"
        else:
            redis_service = named(objs, "Service", f"{variant.fullname}-redis")
            password = secret_data(objs, f"{variant.fullname}-redis")["password"]
            assert settings.redis_url == (f"redis://:{password}@"
                                          f"{redis_service['metadata']['name']}:6379/0"), where
            assert f"requirepass {password}\n" in secret_data(
                objs, f"{variant.fullname}-redis")["redis.conf"]
        assert len(settings.worker_api_key) >= 16, where
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if role == "gateway":
            assert settings.gateway_port == ports["http"], where
            assert len(settings.server_secret) >= 16, where
            if "secrets.apiKeys" in " ".join(variant.args):
                assert settings.api_key_tenants == {"sk-a": "tenant-a", "sk-b": "tenant-b"}
            continue
        # a worker: a unique id, an address gateways reach, the pool where it is mounted
        assert settings.resolved_worker_id == workload["metadata"]["name"] + "-0", where
        assert settings.worker_url == f"http://{POD_IP}:{ports['http']}", where
        assert settings.worker_port == ports["http"] and settings.worker_host == "0.0.0.0"
        pool = str(settings.resolved_pool_path)
        if pool.startswith("/dev/dax"):
            assert pool in mounts or any(
                "/" in r for r in container["resources"].get("limits", {})), where
        else:
            assert str(Path(pool).parent) in mounts, where
    assert found == {"gateway", "worker"} | ({"model"} if not any(
        a.startswith("model.source=") for a in variant.args) else set()), found


@variants
def test_service_links_are_off_in_every_pod(variant: Variant) -> None:
    """Kubernetes puts <SERVICE>_PORT=tcp://... and friends of every Service in the namespace
    into each container unless enableServiceLinks is false. For this release's Services
    they would be BELUGA_* variables that Beluga refuses as unknown settings."""
    from beluga.settings import Settings

    objs = rendered(variant)
    known = {f"BELUGA_{n.upper()}" for n in Settings.model_fields}
    links = {f"{s['metadata']['name'].upper().replace('-', '_')}_SERVICE_HOST"
             for s in by_kind(objs, "Service")}
    if variant.release == "beluga":  # the reason, shown: these would stop every pod
        assert any(v.startswith("BELUGA_") and v not in known for v in links), links
    for w in workloads(objs):
        assert pod_spec(w)["enableServiceLinks"] is False, w["metadata"]["name"]


@variants
def test_workers_map_their_groups_pool(variant: Variant) -> None:
    objs = rendered(variant)
    sets = by_kind(objs, "StatefulSet")
    assert sets and all(component(s) == "worker" for s in sets)
    pool_paths = []
    for sts in sets:
        name = sts["metadata"]["name"]
        group = sts["spec"]["template"]["metadata"]["labels"]["beluga/worker-group"]
        spec = pod_spec(sts)
        (worker,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in worker["env"]}
        pool = env["BELUGA_POOL_PATH"]
        pool_paths.append(pool)
        terms = spec["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [
            {"key": "beluga/kv-pool", "operator": "In", "values": [group]}]}], name
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        limits = worker["resources"]["limits"]
        security = worker["securityContext"]
        if pool.startswith("/dev/dax"):
            assert env["BELUGA_POOL_COHERENCE"] == "flush", name
            assert "BELUGA_POOL_SIZE_GIB" not in env, name  # the device's own size
            if "pool.devdax.access=devicePlugin" in variant.args:
                assert limits["squat.ai/dax"] == 1 and pool not in mounts, name
                assert "privileged" not in security, name
                assert security["allowPrivilegeEscalation"] is False
            else:
                assert volumes[mounts[pool]]["hostPath"] == {"path": pool,
                                                             "type": "CharDevice"}
                assert security == {"privileged": True}, name
        else:
            # every worker of the group maps one file in its node's /dev/shm
            assert pool == f"/dev/shm/beluga/{name.removesuffix('-worker-' + group)}-{group}.pool"
            assert volumes[mounts["/dev/shm/beluga"]]["hostPath"] == {
                "path": "/dev/shm/beluga", "type": "DirectoryOrCreate"}, name
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            # tmpfs pages are charged to the pod that touches them first: room for the pool
            assert quantity(limits["memory"]) >= quantity(f"{env['BELUGA_POOL_SIZE_GIB']}Gi") \
                + quantity(worker["resources"]["requests"]["memory"]) / 2, name
            assert "privileged" not in security
        if "values-gpu.yaml" in " ".join(variant.args):
            assert limits["nvidia.com/gpu"] >= 1 and worker["image"] == "beluga:0.1.0", name
            assert env["BELUGA_ENFORCE_EAGER"] == "false"
            if "privileged" not in security:
                assert security["capabilities"]["add"] == ["IPC_LOCK"], name
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in spec["tolerations"]
        else:
            assert "nvidia.com/gpu" not in limits and worker["image"] == "beluga-cpu:0.1.0"
            assert env["BELUGA_ENFORCE_EAGER"] == "true"
            assert env["BELUGA_CPU_THREADS_BIND"] == "nobind"
            # OpenMP threads plus the core vLLM reserves fit in what the pod requests
            threads = int(env["OMP_NUM_THREADS"] or 0)
            assert threads >= 1 and threads + 1 <= quantity(
                worker["resources"]["requests"]["cpu"]), name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert worker[probe]["httpGet"]["path"] == "/health", (name, probe)
        assert worker["startupProbe"]["periodSeconds"] * \
            worker["startupProbe"]["failureThreshold"] >= 600  # worker_start_timeout_s
    if pool_paths[0].startswith("/dev/shm/"):
        assert len(set(pool_paths)) == len(pool_paths)  # one pool per group


@variants
def test_the_gateway_is_replicated_probed_and_behind_a_service(variant: Variant) -> None:
    objs = rendered(variant)
    (gateway,) = [w for w in workloads(objs) if component(w) == "gateway"]
    assert gateway["kind"] == "Deployment" and gateway["spec"]["replicas"] >= 2
    (c,) = pod_spec(gateway)["containers"]
    assert c["image"] == "beluga-gateway:0.1.0" and c["args"] == ["gateway"]
    app = (ROOT / "gateway" / "app.py").read_text()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert f'@app.get("{path}"' in app, (probe, path)  # a route the gateway serves
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for key in ("requests", "limits"):
        assert c["resources"][key]["memory"], key
    service = named(objs, "Service", f"{variant.fullname}-gateway")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    pdb = named(objs, "PodDisruptionBudget", f"{variant.fullname}-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    # drains (drain_timeout_s, 30 s) before Kubernetes kills it
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] > 30
    for w in workloads(objs):
        for c in containers(w):
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], \
                (w["metadata"]["name"], c["name"])
            if c["name"] != "prepare-model":
                assert c.get("livenessProbe") and c.get("readinessProbe"), c["name"]


def test_worker_groups_scale_and_grow_with_set() -> None:
    """The README's commands: a group's replicas, another group beside it, one removed."""
    def groups(*args: str) -> dict[str, int]:
        return {s["metadata"]["name"]: s["spec"]["replicas"]
                for s in by_kind(template("beluga", *args), "StatefulSet")}

    assert groups() == {"beluga-worker-a": 2}
    assert groups("--set", "worker.groups.a.replicas=4") == {"beluga-worker-a": 4}
    assert groups("--set", "worker.groups.b.replicas=3") == {"beluga-worker-a": 2,
                                                             "beluga-worker-b": 3}
    assert groups("--set", "worker.groups.a=null", "--set", "worker.groups.b.replicas=1") \
        == {"beluga-worker-b": 1}


def test_the_grafana_dashboard_is_the_file_in_dashboards() -> None:
    board_file = ROOT / "dashboards" / "grafana" / "beluga.json"
    for variant in VARIANTS:
        objs = rendered(variant)
        cm = named(objs, "ConfigMap", f"{variant.fullname}-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"]["beluga.json"] == board_file.read_text(), "the dashboard drifted"
    board = json.loads(board_file.read_text())
    objs = rendered(BY_NAME["operator-monitoring"])
    source = yaml.safe_load(named(objs, "ConfigMap", "beluga-grafana-datasource")["data"][
        "beluga-datasource.yaml"])["datasources"]
    assert len(source) == 1 and source[0]["type"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == source[0]["uid"], panel["title"]
    assert not [o for o in rendered(VARIANTS[0]) if o["metadata"]["name"].endswith(
        "grafana-datasource")]


def relabel_keep(config: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a scrape job's `keep` rules keep a target with these meta labels."""
    for rule in config["relabel_configs"]:
        if rule.get("action") == "keep":
            value = ";".join(labels.get(s, "") for s in rule["source_labels"])
            if not re.fullmatch(rule["regex"], value):
                return False
    return True


@variants
def test_the_plain_prometheus_scrape_config_finds_gateways_and_workers(
        variant: Variant, tmp_path: Path) -> None:
    objs = rendered(variant)
    text = named(objs, "ConfigMap", f"{variant.fullname}-prometheus")["data"][
        "prometheus.yml"]
    config = yaml.safe_load(text)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"beluga-gateway", "beluga-workers"}
    want = {"gateway": "beluga-gateway", "worker": "beluga-workers", "redis": None}
    for w in workloads(objs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        for c in containers(w, init=False):
            for port in c.get("ports", []):
                meta = {f"__meta_kubernetes_pod_label_{k.replace('.', '_').replace('/', '_')}"
                        .replace("-", "_"): v for k, v in labels.items()}
                meta["__meta_kubernetes_pod_container_port_name"] = port["name"]
                kept = {name for name, job in jobs.items() if relabel_keep(job, meta)}
                expected = want[component(w)]
                assert kept == ({expected} if expected else set()), (w["metadata"]["name"], kept)
    for job in jobs.values():
        assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [NAMESPACE]
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    if shutil.which("promtool") is None:
        return  # tests/test_dashboards.py says what is missing
    out = promtool_check(tmp_path, text)
    if "field kubernetes_sd_configs not found" in out.stderr:
        # Debian's Prometheus is built without Kubernetes discovery: promtool checks the rest
        # (globals, jobs, relabelling) with the discovery swapped for a static target.
        for job in config["scrape_configs"]:
            assert list(job.pop("kubernetes_sd_configs")[0]) == ["role", "namespaces"]
            job["static_configs"] = [{"targets": ["10.244.3.17:8000"]}]
        out = promtool_check(tmp_path, yaml.safe_dump(config))
    assert out.returncode == 0, out.stdout + out.stderr


def promtool_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "prometheus.yml").write_text(text)
    return subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)


def test_secrets_are_generated_or_taken_from_values_never_shipped() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["secrets"]["workerApiKey"] == values["secrets"]["serverSecret"] == ""
    assert values["redis"]["password"] == ""
    first, second = template("beluga"), template("beluga")
    for name, key in (("beluga", "worker-api-key"), ("beluga", "server-secret"),
                      ("beluga-redis", "password")):
        a, b = secret_data(tuple(first), name)[key], secret_data(tuple(second), name)[key]
        assert len(a) >= 32 and re.fullmatch(r"[A-Za-z0-9]+", a) and a != b, key
    given = tuple(template("beluga", "--set", "secrets.workerApiKey=wk-0123456789abcdef",
                           "--set", "redis.password=rp-0123456789"))
    assert secret_data(given, "beluga")["worker-api-key"] == "wk-0123456789abcdef"
    assert secret_data(given, "beluga-redis")["url"] == \
        "redis://:rp-0123456789@beluga-redis:6379/0"
    refused = helm("template", "beluga", str(CHART), "--set", "redis.password=a@b",
                   check=False)
    assert refused.returncode != 0 and "redis.password" in refused.stderr


@pytest.mark.parametrize(("args", "message"), [
    # values.schema.json
    (("--set", "worker.replicas=3"), r"/worker': additional properties 'replicas'"),
    (("--set", "gateway.replica=3"), r"/gateway': additional properties 'replica'"),
    (("--set", "worker.accelerator=tpu"), r"/worker/accelerator'"),
    (("--set", "pool.backing=nfs"), r"/pool/backing'"),
    (("--set", "worker.groups.Rack_1.replicas=1"), r"invalid propertyName 'Rack_1'"),
    (("--set", "worker.groups.a=null"), r"/worker/groups': minProperties"),
    # the templates' own checks (what a schema cannot say)
    (("--set", "model.source=hub"), r"model\.hubId \(org/name\) is required"),
    (("--set", "model.source=volume"), r"model\.volume\.claimName is required"),
    (("-f", str(CHART / "values-cxl.yaml"), "--set", "pool.devdax.path=/dev/shm/x"),
     r"pool\.devdax\.path must be a device-DAX node"),
    (("-f", str(CHART / "values-cxl.yaml"), "--set", "pool.devdax.access=devicePlugin"),
     r"pool\.devdax\.devicePluginResource is required"),
    (("--set", "redis.enabled=false"), r"redis\.externalUrl is required"),
])
def test_bad_values_are_refused_with_a_reason(args: tuple[str, ...], message: str) -> None:
    out = helm("template", "beluga", str(CHART), *args, check=False)
    assert out.returncode != 0 and re.search(message, out.stderr), out.stderr


def test_the_readme_matches_the_chart() -> None:
    readme = (DEPLOY / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name in set(re.findall(r"\b(values-[a-z]+\.yaml)\b", readme)):
        assert (CHART / name).is_file(), name
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in set(re.findall(r"--set[ =]([A-Za-z.\[\]0-9]+)=", readme)):
        node: Any = schema  # the path must be one values.schema.json admits
        for part in re.findall(r"[A-Za-z]+|\[\d+\]", path):
            if part.startswith("["):
                assert node.get("type") == "array", f"README names {path}"
                node = node["items"]
            elif part in node.get("properties", {}):
                node = node["properties"][part]
            else:  # a free-form map (labels, env)
                assert isinstance(node.get("additionalProperties"), dict), \
                    f"README names {path}"
                node = node["additionalProperties"]
    assert f"{values['pool']['nodeLabel']}=" in readme
    from beluga.settings import Settings

    for var in set(re.findall(r"\b(BELUGA_[A-Z_]+)\b", readme)):
        assert var.removeprefix("BELUGA_").lower() in Settings.model_fields, var
