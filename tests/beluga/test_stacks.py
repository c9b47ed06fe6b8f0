"""SIGUSR1 dumps a live process's thread stacks and leaves it running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, threading, time
from beluga.stacks import dump_stacks_on_sigusr1
dump_stacks_on_sigusr1()
def parked_in_a_named_function():
    time.sleep(60)
threading.Thread(target=parked_in_a_named_function, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    print("still here", flush=True)
"""


def test_sigusr1_writes_every_threads_stack_and_the_process_goes_on() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        proc.stdin.write("ping\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "still here\n"
        proc.stdin.close()
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "parked_in_a_named_function" in err and "Thread 0x" in err
    finally:
        proc.kill()
