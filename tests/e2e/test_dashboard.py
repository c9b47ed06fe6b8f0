"""The gateway's /dashboard in a real headless browser (Debian's chromium) after traffic
through the running stack: every chart holds data, the pool's included (the stack's gateway
maps the workers' pool). The screenshot is kept in tests/artifacts/ for the record."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time

import openai
import pytest

from tests.e2e.conftest import MODEL_NAME, ROOT, Stack

ARTIFACTS = ROOT / "tests" / "artifacts"
CHARTS = ("ttft", "tokens", "share", "load", "pool_used", "pool_evictions")


def chromium(*args: str, timeout: float = 120) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is missing: run `make setup` (it installs Debian's chromium)")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_dashboard_charts_the_traffic(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)
    long_text = " ".join(f"Note {i}: the river {i} flows {i * 7 % 100} miles." for i in range(40))
    for i in range(4):   # streamed: the gateway measures TTFT on streams
        stream = client.chat.completions.create(
            model=MODEL_NAME, stream=True, max_tokens=4,
            messages=[{"role": "user", "content": f"{long_text} Question {i}?"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    time.sleep(5)        # two or more samples after the traffic

    dom = chromium("--virtual-time-budget=10000", "--dump-dom", f"{stack.base_url}/dashboard")
    points = {}
    for chart in CHARTS:
        m = re.search(rf'id="{chart}"[^>]*data-points="(\d+)"', dom)
        assert m is not None, f"chart {chart} was not drawn:\n{dom[:3000]}"
        points[chart] = int(m.group(1))
    assert all(n > 0 for n in points.values()), points
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium("--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=1400,1000",
             f"{stack.base_url}/dashboard")
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_the_dashboard_serves_its_chart_library_locally(stack: Stack) -> None:
    import httpx
    page = httpx.get(f"{stack.base_url}/dashboard", timeout=10)
    assert page.status_code == 200 and "/dashboard/assets/uPlot.iife.min.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text   # no CDN
    lib = httpx.get(f"{stack.base_url}/dashboard/assets/uPlot.iife.min.js", timeout=10)
    assert lib.status_code == 200 and "uPlot" in lib.text
    assert httpx.get(f"{stack.base_url}/dashboard/assets/..%2F..%2Fapp.py",
                     timeout=10).status_code == 404


def test_every_metric_the_grafana_board_queries_is_exported(stack: Stack) -> None:
    import httpx

    from tests.test_dashboards import queried_metrics
    exported: set[str] = set()
    for url in (stack.base_url, *stack.worker_urls):
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    missing = queried_metrics() - exported
    assert not missing, sorted(missing)
