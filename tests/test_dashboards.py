"""dashboards/: Prometheus accepts the scrape config (promtool), and the Grafana provisioning
wires the dashboard to that Prometheus. (That every metric the dashboard queries is exported
by a running stack is checked in tests/e2e/test_dashboard.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASH = ROOT / "dashboards"


def grafana_exprs() -> list[str]:
    board = json.loads((DASH / "grafana" / "beluga.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def queried_metrics() -> set[str]:
    """Metric names the Grafana dashboard queries (beluga_* and vllm:*)."""
    names: set[str] = set()
    for expr in grafana_exprs():
        names |= set(re.findall(r"\b(?:beluga_[a-z0-9_]+|vllm:[a-z0-9_]+)", expr))
    return names


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="Debian's prometheus (promtool) is not installed")
def test_promtool_accepts_the_scrape_config() -> None:
    out = subprocess.run(["promtool", "check", "config", str(DASH / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((DASH / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["beluga-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    targets = {t for sc in jobs["beluga-workers"]["static_configs"] for t in sc["targets"]}
    assert {"worker-0:8100", "worker-1:8100", "cpu-worker-0:8100"} <= targets


def test_grafana_provisioning_points_at_prometheus_and_the_board() -> None:
    sources = yaml.safe_load(
        (DASH / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    board = json.loads((DASH / "grafana" / "beluga.json").read_text())
    # Every query reads the board's datasource variable (so the board imports into an
    # existing Grafana), which defaults to the provisioned Prometheus.
    (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus" and var["current"]["value"] == source["uid"]
    uses = {"type": "prometheus", "uid": "${" + var["name"] + "}"}
    for panel in board["panels"]:
        assert panel["datasource"] == uses, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == uses for t in panel["targets"]), panel["title"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    titles = " ".join(p["title"] for p in board["panels"])
    for needed in ("End-to-end latency", "Inter-token latency", "Tokens per second",
                   "mispredictions"):
        assert needed in titles
    providers = yaml.safe_load(
        (DASH / "grafana" / "provisioning" / "dashboards" / "beluga.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    names = queried_metrics()
    assert any(n.startswith("vllm:") for n in names)          # the engine's own metrics
    assert {"beluga_gateway_ttft_seconds_bucket", "beluga_worker_prompt_tokens_total",
            "beluga_pool_used_slots"} <= names
