"""Thread stacks of a live process on demand, for hangs."""

from __future__ import annotations

import contextlib
import faulthandler
import signal


def dump_stacks_on_sigusr1() -> None:
    """From now on `kill -USR1 <pid>` makes this process write every thread's Python stack to
    its stderr (a worker's log) and go on as before: what an operator, or the e2e suite,
    needs when a vLLM step hangs. BelugaConnector calls it, so the vLLM engine and model
    runner processes that run it answer the signal; other processes keep SIGUSR1's default."""
    with contextlib.suppress(AttributeError, ValueError, RuntimeError):  # not on every OS
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
