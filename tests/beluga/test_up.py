from __future__ import annotations

import logging
import subprocess

import pytest
from pydantic import ValidationError

from beluga.settings import Settings
from beluga.up import beluga_command, core_shares, worker_cores
from engine.worker import vllm_env


def test_each_worker_gets_its_own_cores() -> None:
    assert core_shares([0, 1], 2) == ["0", "1"]
    assert core_shares(list(range(8)), 2) == ["0,1,2,3", "4,5,6,7"]
    assert core_shares([0, 2, 4, 6, 8], 2) == ["0,2", "4,6,8"]
    assert core_shares([3], 1) == ["3"]
    assert core_shares([0, 1], 3) == ["0", "1", "0"]   # fewer cores than workers: shared


def test_beluga_up_splits_only_the_cores_beyond_the_reserve() -> None:
    assert worker_cores(list(range(9)), 2, 1) == ["1,2,3,4", "5,6,7,8"]
    assert worker_cores([0, 1, 2], 2, 1) == ["1", "2"]
    assert worker_cores([0, 1], 2, 1) == ["nobind", "nobind"]  # not all pinned to core 0
    assert worker_cores(list(range(8)), 1, 1) is None


def test_the_binding_reaches_vllm_and_bad_lists_are_refused() -> None:
    assert vllm_env(Settings())["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert vllm_env(Settings(cpu_threads_bind="0-3,8"))["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,8"
    for bad in ("0-", "a", "1;rm", ""):
        with pytest.raises(ValidationError):
            Settings(cpu_threads_bind=bad)


def test_unbound_workers_get_their_share_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(2)))
    assert vllm_env(Settings(cpu_threads_bind="nobind"))["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(10)))
    assert vllm_env(Settings(cpu_threads_bind="nobind"))["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in vllm_env(Settings())  # bound: vLLM sets it
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert vllm_env(Settings(cpu_threads_bind="nobind"))["OMP_NUM_THREADS"] == "3"


def test_children_log_at_the_level_beluga_up_was_given() -> None:
    root = logging.getLogger()
    old = root.level
    try:
        root.setLevel(logging.DEBUG)
        cmd = beluga_command()
    finally:
        root.setLevel(old)
    assert cmd[-2:] == ["--log-level", "DEBUG"]
    # ... and the child accepts it
    out = subprocess.run([*cmd, "gateway", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
