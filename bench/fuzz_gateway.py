"""A long randomized fuzz run against a real stack: schemathesis (valid and broken requests
drawn from the gateway's /openapi.json) and hostile requests (tests/hostile.py), at random.

    python bench/fuzz_gateway.py --minutes N [--url http://127.0.0.1:8000] [--seed S]

Without --url it starts its own stack (`beluga up` with default settings, as `make run`) and
stops it at the end. `make test` runs the same schemathesis strategies from a fixed seed
(tests/fuzz.py); this run draws from a random seed (printed: `--seed` replays the same
draw, up to the timing of the stack's answers), in rounds: each round is either
`--examples` schemathesis cases of one operation and mode (positive or negative), or
(with probability `--hostile-share`) one request of a hostile class picked at random.

Every distinct 5xx and every hang (no answer within `--timeout` s) is printed once, with a
curl command that reproduces it (huge bodies shortened, saying how they go on),
de-duplicated by (status, error type, code, the shape of the message: digits and quoted
parts blanked). At the end, one summary line: requests, by status, distinct 5xx, hangs.
Exit status 1 when any 5xx came from the gateway's own code (500 internal_error) or any
request hung.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import hostile as h  # noqa: E402
from tests.fuzz import capped, drive, operations  # noqa: E402


def shape(message: str) -> str:
    """A message with what varies per request blanked: quoted parts, numbers, ids."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    text = re.sub(r"0x[0-9a-f]+|[0-9a-f]{8,}|\d+(\.\d+)?", "N", text)
    return text[:120]


class Findings:
    """Statuses of every request; the first reproduction of every distinct 5xx or hang."""

    def __init__(self) -> None:
        self.by_status: Counter[str] = Counter()
        self.distinct: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.requests = 0
        self.hangs = 0
        self.internal = 0

    def note(self, status: int | None, etype: str | None, code: str | None, message: str,
             repro: str, elapsed: float, source: str, hang: bool) -> None:
        self.requests += 1
        self.by_status["hang" if hang else ("none" if status is None else str(status))] += 1
        if hang:
            self.hangs += 1
        if status is not None and status == 500 and etype in ("internal_error", None):
            self.internal += 1
        if not hang and (status is None or status < 500):
            return
        key = ("hang" if hang else str(status), str(etype), str(code), shape(message))
        if key in self.distinct:
            self.distinct[key]["count"] += 1
            return
        self.distinct[key] = {"count": 1, "status": key[0], "type": etype, "code": code,
                              "message": message[:300], "source": source,
                              "elapsed_s": round(elapsed, 2), "repro": repro}
        print(f"\nNEW {key[0]} {etype}/{code} after {elapsed:.1f} s ({source}): "
              f"{message[:200]}\n  {repro[:1500]}", flush=True)


def case_repro(kwargs: dict[str, Any]) -> str:
    url = kwargs["url"]
    if kwargs.get("params"):
        url += "?" + urlencode(kwargs["params"], doseq=True)
    headers = {k: str(v) for k, v in (kwargs.get("headers") or {}).items()
               if k.lower() not in ("user-agent", "x-schemathesis-testcaseid")}
    body: bytes | None = None
    if "json" in kwargs:
        body = json.dumps(kwargs["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body = data if isinstance(data, bytes) else str(data).encode()
    return h.curl_command(kwargs["method"], url, headers, body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--url", help="a running stack's gateway (default: start one)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, help="default: a random one (printed)")
    ap.add_argument("--examples", type=int, default=20, help="schemathesis cases per round")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds without an answer that count as a hang")
    ap.add_argument("--hostile-share", type=float, default=0.3,
                    help="share of rounds that send a hostile request instead")
    ap.add_argument("--json", type=Path, help="write the findings here")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(48)
    print(f"seed {seed} (replay: --seed {seed})", flush=True)

    with h.stack_at(args.url, None) as (url, _redis_url):
        return run(args, url, seed)


def run(args: argparse.Namespace, url: str, seed: int) -> int:
    rng = random.Random(seed)
    findings = Findings()
    ops = list(operations(url))
    prepare = capped(args.model, (("max_tokens", 16), ("max_completion_tokens", 16),
                                  ("n", 2)))
    hostile = {name: build(args.model, h.TEST) for name, build in h.REQUEST_CLASSES.items()}
    session = requests.Session()
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    last_report = time.monotonic()

    def test(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        prepare(case)
        try:
            kwargs = case.as_transport_kwargs(base_url=url)
            repro = case_repro(kwargs)
        except Exception as exc:  # noqa: BLE001 - a case schemathesis cannot serialize
            findings.by_status["unsendable"] += 1
            del exc
            return
        start = time.monotonic()
        try:
            resp = case.call(base_url=url, session=session, timeout=args.timeout)
        except requests.Timeout as exc:
            findings.note(None, None, None, f"no answer in {args.timeout:g} s: {exc}", repro,
                          time.monotonic() - start, case.operation.label, hang=True)
            return
        except requests.RequestException as exc:
            findings.note(None, None, None, f"{type(exc).__name__}: {exc}", repro,
                          time.monotonic() - start, case.operation.label, hang=False)
            return
        etype = code = None
        message = ""
        if resp.status_code >= 400:
            etype, code, message = h.error_fields(resp.content)
        findings.note(resp.status_code, etype, code, message, repro,
                      time.monotonic() - start, case.operation.label, hang=False)

    while time.monotonic() < deadline:
        rounds += 1
        if rng.random() < args.hostile_share:
            name = rng.choice(sorted(hostile))
            req = rng.choice(hostile[name])
            with httpx.Client() as client:
                o = h.send(client, url, name, req)
            hang = o.status is None and "timeout" in o.message
            findings.note(o.status, o.error_type, o.error_code, o.message, o.repro,
                          o.elapsed_s, f"hostile {name}: {req.label}", hang=hang)
        else:
            op, mode = rng.choice(ops)
            try:
                drive(op, mode, args.examples, rng.getrandbits(64), test)
            except Exception as exc:  # noqa: BLE001 - hypothesis itself gave up on a round
                findings.by_status[f"round_error:{type(exc).__name__}"] += 1
        if time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            left = max(0.0, deadline - time.monotonic()) / 60
            print(f"[{left:.1f} min left] {findings.requests} requests, "
                  f"{dict(findings.by_status)}", flush=True)

    ok, text = h.ask_paris(url, args.model)
    distinct_5xx = sum(1 for k in findings.distinct if k[0] != "hang")
    print()
    for key, f in findings.distinct.items():
        print(f"{f['count']:>5} x {key[0]} {f['type']}/{f['code']} ({f['source']}): "
              f"{f['message'][:160]}\n        {f['repro'][:600]}")
    summary = (f"SUMMARY seed={seed} minutes={args.minutes:g} rounds={rounds} "
               f"requests={findings.requests} by_status={dict(sorted(findings.by_status.items()))} "
               f"5xx_distinct={distinct_5xx} internal_error_5xx={findings.internal} "
               f"hangs={findings.hangs} paris={ok}")
    print(summary)
    if args.json:
        args.json.write_text(json.dumps({
            "seed": seed, "minutes": args.minutes, "requests": findings.requests,
            "by_status": findings.by_status, "hangs": findings.hangs,
            "internal_error_5xx": findings.internal, "paris": ok,
            "distinct": list(findings.distinct.values())}, indent=1))
    return 1 if findings.internal or findings.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
