# Beluga. `make help` lists the targets.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: help setup run test lint unit e2e sanitize gpu-check clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## Install everything (venv, pinned vLLM, Redis, the default model); idempotent
	@scripts/setup.sh

run: setup ## Set up, then start Redis, two workers and the gateway on :8000 (Ctrl-C stops all)
	$(BIN)/beluga up

lint: setup ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: setup ## Fast tests (no vLLM)
	$(BIN)/pytest -q -m "not e2e"

e2e: setup ## End-to-end tests against a real stack
	$(BIN)/pytest -q -m e2e

test: setup ## Set up, then lint, type-check, run every test, then the pool's hostile tests under ASan + UBSan
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q
	scripts/sanitize.sh tests/kvpool/test_hostile_pool.py tests/kvpool/test_pool_fuzz.py tests/kvpool/test_pool.py

sanitize: setup ## The native pool under ASan + UBSan: kvpool tests and the fixed-seed fuzz run
	scripts/sanitize.sh

gpu-check: ## On a CUDA host: build the GPU copy path, run the GPU tests and the GPU transfer bench
	scripts/gpu_check.sh

clean: ## Remove logs and run state (keeps .venv and the prepared model)
	rm -rf .beluga/logs .beluga/redis .pytest_cache .mypy_cache .ruff_cache
