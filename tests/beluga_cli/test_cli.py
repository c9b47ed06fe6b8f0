"""The `beluga` command: arguments after `--` go to vLLM, and a bad setting (flag, variable or
config file) is one error line naming it, exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from beluga_cli.cli import (
    UP_FIELDS,
    WORKER_FIELDS,
    build_parser,
    main,
    settings_from_args,
    split_passthrough,
)
from beluga_cli.up import Stack, up_settings
from engine.worker import vllm_command

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> object:
    own, vllm_args = split_passthrough(argv)
    args = build_parser().parse_args(own)
    args.vllm_args = vllm_args
    return args


def test_arguments_after_the_double_dash_reach_the_vllm_command_line() -> None:
    args = parse(["worker", "--vllm-extra-args=--seed 3", "--", "--max-num-batched-tokens",
                  "512", "--served-model-name", "two words"])
    s = settings_from_args(args, WORKER_FIELDS)  # type: ignore[arg-type]
    assert s.vllm_extra_args == "--seed 3 --max-num-batched-tokens 512 --served-model-name " \
        "'two words'"
    assert vllm_command(s)[-6:] == ["--seed", "3", "--max-num-batched-tokens", "512",
                                    "--served-model-name", "two words"]


def test_beluga_up_hands_them_to_every_worker(tmp_path: Path) -> None:
    args = parse(["up", "--state-dir", str(tmp_path), "--", "--seed", "7"])
    stack = Stack(up_settings(settings_from_args(args, UP_FIELDS)))  # type: ignore[arg-type]
    workers = [spec for spec in stack.plan() if spec.role == "worker"]
    assert len(workers) == 2
    assert all(spec.env and spec.env["BELUGA_VLLM_EXTRA_ARGS"] == "--seed 7" for spec in workers)


def test_only_the_first_double_dash_splits() -> None:
    assert split_passthrough(["worker", "--worker-port", "8101"]) == (
        ["worker", "--worker-port", "8101"], [])
    assert split_passthrough(["up", "--", "--a", "--", "--b"]) == (["up"], ["--a", "--", "--b"])


@pytest.mark.parametrize("argv", [["gateway", "--", "--seed", "1"],
                                  ["model", "prepare", "--", "--seed", "1"]])
def test_commands_without_vllm_refuse_arguments_for_it(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "arguments after `--` go to vLLM" in capsys.readouterr().err


def beluga(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELUGA_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "beluga_cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("text", "expected"), [
    ("gateway_port: 70000\n", "gateway_port: Input should be less than or equal to 65535"),
    ("gateway_prot: 9000\n", "'gateway_prot' is not a setting (did you mean gateway_port?)"),
    ("redis_url: http://redis\n", "invalid settings: redis_url: Value error, redis_url must "
     "start with redis://"),
    ("api_keys: sk-no-tenant-here\n", "invalid settings: api_keys: Value error, api_keys must "
     "be comma-separated"),
])
def test_a_bad_config_file_stops_the_command_with_one_line(tmp_path: Path, text: str,
                                                           expected: str) -> None:
    (tmp_path / "beluga.yaml").write_text(text)
    done = beluga("gateway", "--config", "beluga.yaml", cwd=tmp_path)
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "sk-no-tenant-here" not in done.stderr


def test_a_bad_flag_value_is_one_line_too_and_quotes_no_password(tmp_path: Path) -> None:
    done = beluga("gateway", "--redis-url", "http://:pa55word@x", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "invalid settings: redis_url: Value error" in done.stderr
    assert "pa55word" not in done.stderr
    done = beluga("gateway", "--max-attempts", "0", cwd=tmp_path)
    assert "invalid settings: max_attempts: Input should be greater than or equal to 1 " \
        "(got 0)" in done.stderr
