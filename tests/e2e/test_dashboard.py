"""The gateway's /dashboard in a real headless browser (Debian's chromium, driven through
chromedriver by Selenium) after traffic through the running stack: every chart holds data,
the pool's included (the stack's gateway maps the workers' pool), and the page keeps
refreshing. The screenshot is kept in tests/artifacts/ for the record."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator

import openai
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.e2e.conftest import MODEL_NAME, ROOT, Stack

ARTIFACTS = ROOT / "tests" / "artifacts"
CHARTS = ("ttft", "hits", "tokens", "share", "load", "pool_used", "pool_evictions")
TILES = ("h_ttft", "h_local", "h_pool", "h_fill", "h_rps")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_binary = shutil.which("chromedriver")
    if binary is None or driver_binary is None:
        pytest.fail("chromium or chromedriver is missing: run `make setup` (it installs "
                    "Debian's chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The Debian driver is given: Selenium Manager would try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_binary))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# What each chart holds, read from the uPlot instances the page draws (not from the HTML).
CHART_STATE = """
const out = {};
for (const id of arguments[0]) {
  const c = charts[id];
  const el = document.getElementById(id);
  out[id] = c ? {
    canvas: el.querySelectorAll("canvas").length,
    series: c.plot.series.slice(1).map(s => s.label),
    values: c.plot.data.slice(1).reduce((n, ys) => n + ys.filter(v => v !== null).length, 0),
  } : null;
}
const t = charts.ttft ? charts.ttft.plot.data[0] : [];
out.last = t.length ? t[t.length - 1] : 0;  // the newest sample's time
return out;
"""


def test_the_dashboard_charts_the_traffic(stack: Stack, browser: webdriver.Chrome) -> None:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)
    long_text = " ".join(f"Note {i}: the river {i} flows {i * 7 % 100} miles." for i in range(40))
    for i in range(4):   # streamed: the gateway measures TTFT on streams
        stream = client.chat.completions.create(
            model=MODEL_NAME, stream=True, max_tokens=4,
            messages=[{"role": "user", "content": f"{long_text} Question {i}?"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    time.sleep(5)        # two or more samples after the traffic

    browser.get(f"{stack.base_url}/dashboard")

    def charted(driver: webdriver.Chrome) -> dict[str, object] | None:
        state: dict[str, object] = driver.execute_script(CHART_STATE, list(CHARTS))
        done = all(isinstance(c := state[k], dict) and c["canvas"] and c["values"]
                   for k in CHARTS)
        return state if done else None

    try:
        found = WebDriverWait(browser, 20, poll_frequency=0.25).until(charted)
    except TimeoutException:
        pytest.fail(f"charts without data: {browser.execute_script(CHART_STATE, list(CHARTS))}")
    assert found is not None
    state = found
    tokens = state["tokens"]
    assert isinstance(tokens, dict) and tokens["series"] == ["local", "pool", "computed"]
    share = state["share"]
    assert isinstance(share, dict) and set(share["series"]) <= {w.id for w in stack.workers()}
    # Live: the page polls every 2 s and redraws with the newer samples.
    first = state["last"]
    assert isinstance(first, int | float) and first > 0
    WebDriverWait(browser, 10, poll_frequency=0.25).until(
        lambda d: d.execute_script(CHART_STATE, [])["last"] > first)
    # The headline: numbers at a glance, over the last 30 s of this traffic.
    tiles = {t: browser.find_element(By.ID, t) for t in TILES}
    values = {t: e.get_attribute("data-value") for t, e in tiles.items()}
    assert float(values["h_ttft"] or 0) > 0 and float(values["h_rps"] or 0) > 0, values
    assert 0 <= float(values["h_local"] or -1) <= 1, values
    assert 0 <= float(values["h_pool"] or -1) <= 1, values
    assert tiles["h_ttft"].text.endswith(("ms", "s")) and tiles["h_local"].text.endswith("%")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000


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
