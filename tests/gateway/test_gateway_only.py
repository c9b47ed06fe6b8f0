"""A gateway installed without vLLM starts and routes to workers.

The install is made as pip would make `pip install beluga` from a tree without engine/ (what
docker/Dockerfile.gateway does): a fresh virtual environment whose site-packages holds the
distributions pyproject.toml's `dependencies` pull in (their closure, read from the installed
metadata, markers evaluated) and Beluga's gateway-side packages, nothing else: no vLLM, no
torch, no engine/. A dependency the gateway imports but does not declare is simply absent
there, as it is after a real install (transformers was: the gateway crashed at start).

`beluga gateway` runs in it as a subprocess, with the default model's tokenizer (chat
templates included), in front of a real Redis and a stand-in worker registered there with a
real hint record, so the request it routes is keyed by the tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import time
import tomllib
import venv
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from beluga.registry import SCHEMA_VERSION, worker_key
from engine.hints import HintPublisher
from tests.support import RedisServer, free_port, serve

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct"
GATEWAY_PACKAGES = ("beluga", "beluga_cli", "gateway", "kvpool")
PREFIX = "beluga:test-gateway-only"
FP = hashlib.sha256(b"gateway-only").digest()


def closure(requirements: Iterable[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions `requirements` pull in, transitively (extras followed,
    environment markers evaluated here), by canonical name."""
    found: dict[str, importlib.metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    queue = [Requirement(r) for r in requirements]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        try:
            dist = found.get(name) or importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (a dependency of the gateway install) is not installed "
                        "here: run `make setup`")
        found[name] = dist
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in done:
                continue
            done.add((name, extra))
            for text in dist.requires or []:
                sub = Requirement(text)
                marker = str(sub.marker) if sub.marker is not None else ""
                if extra and "extra" not in marker:
                    continue  # taken on the plain pass
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    queue.append(sub)
    return found


def make_gateway_install(where: Path) -> Path:
    """A virtual environment holding only the gateway install; its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dist in closure(project["dependencies"]).values():
        assert dist.files is not None, f"{dist.metadata['Name']} lists no files"
        for top in sorted({f.parts[0] for f in dist.files}):
            if top in ("..", "__pycache__") or (site / top).exists():
                continue
            (site / top).symlink_to(Path(str(dist.locate_file(top))))
    for package in GATEWAY_PACKAGES:
        (site / package).symlink_to(ROOT / package)
    native = sorted(ROOT.glob("beluga_native*.so"))
    if not native:
        pytest.fail("the native pool module is not built: run `make setup`")
    (site / native[0].name).symlink_to(native[0].resolve())
    return python


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BELUGA_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gateway_install(tmp_path_factory.mktemp("gateway-only") / "venv")


def run_in(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=120)


def test_the_install_has_no_vllm_torch_or_engine_and_imports_the_gateway(
        python: Path, tmp_path: Path) -> None:
    absent = run_in(python, "import importlib.util as u; print([m for m in "
                    "('vllm', 'torch', 'engine', 'triton') if u.find_spec(m)])", tmp_path)
    assert absent.returncode == 0 and absent.stdout.strip() == "[]", absent.stderr
    loaded = run_in(python, "import gateway.app, gateway.server, beluga_cli.cli, kvpool; "
                    "import transformers; print(transformers.is_torch_available())", tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False"


def test_the_tokenizer_renders_chat_templates_without_torch(python: Path,
                                                             tmp_path: Path) -> None:
    if not MODEL.is_dir():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    code = ("import sys; from transformers import AutoTokenizer;"
            "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
            "text = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False,"
            " add_generation_prompt=True);"
            "print(repr(text)); print(len(t(text)['input_ids']))")
    done = subprocess.run([str(python), "-c", code, str(MODEL)], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text, count = done.stdout.strip().splitlines()
    assert "hi" in text and "assistant" in text and int(count) > 3


@pytest.mark.parametrize("command", [["worker"], ["up"], ["model", "prepare"]])
def test_the_engine_commands_say_what_is_missing(python: Path, tmp_path: Path,
                                                 command: list[str]) -> None:
    done = subprocess.run([str(python), "-m", "beluga_cli", *command], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "this install lacks" in done.stderr and "engine-cpu" in done.stderr
    assert "Traceback" not in done.stderr


def stand_in() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"object": "chat.completion", "model": body["model"], "answered_by": "w1",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Paris."}}]}

    return app


@pytest.fixture
def gateway_only(python: Path, tmp_path: Path) -> Iterator[str]:
    """`beluga gateway` of the gateway-only install in front of a real Redis and a stand-in
    worker (registered, with a hint record); yields the gateway's URL."""
    if not MODEL.is_dir():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    redis_server = RedisServer().start()
    hints = HintPublisher(redis_server.url, PREFIX, "w1", FP, 16, None, ttl_s=60,
                          interval_s=0.1, max_keys=100)
    log = (tmp_path / "gateway.log").open("wb")
    proc = None
    try:
        for worker_url in serve(stand_in()):
            rec = {"schema": SCHEMA_VERSION, "id": "w1", "url": worker_url, "model": "m",
                   "capacity": 4, "pid": 1, "started_at": 0.0,
                   "heartbeat_at": time.time() + 600, "running": 0, "waiting": 0}
            redis_server.client().set(worker_key(PREFIX, "w1"), json.dumps(rec), ex=600)
            port = free_port()
            proc = subprocess.Popen(
                [str(python), "-m", "beluga_cli", "gateway", "--gateway-host", "127.0.0.1",
                 "--gateway-port", str(port), "--redis-url", redis_server.url,
                 "--redis-key-prefix", PREFIX, "--served-model-name", "m", "--model",
                 str(MODEL), "--state-dir", str(tmp_path / "state"),
                 "--registry-refresh-s", "0.1"],
                cwd=tmp_path, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the gateway did not answer /health"
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        log.close()
        hints.close()
        redis_server.stop()


def counter(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(name))


def test_a_gateway_without_vllm_starts_and_routes_keyed_prompts_to_a_worker(
        gateway_only: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "The capital of France? " * 8}]}
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(f"{gateway_only}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["answered_by"] == "w1" and r.headers["x-beluga-worker"] == "w1"
        # keyed by the tokenizer (template rendered, tokens counted), once the gateway has
        # read the worker's hint record
        if counter(gateway_only, "beluga_gateway_prompt_tokens_total") > 0:
            break
        assert time.monotonic() < deadline, "the gateway never keyed a prompt"
        time.sleep(0.2)
    for reason in ("error", "untokenizable"):
        unkeyed = f'beluga_gateway_prompts_unkeyed_total{{reason="{reason}"}}'
        assert counter(gateway_only, unkeyed) == 0, reason
