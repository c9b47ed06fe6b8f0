"""A worker killed with SIGKILL while requests continue: requests not yet answered succeed
on the other worker, streams the victim was sending end with a clear error event, and the
pool the victim was saving into stays consistent for the survivor.

Runs last in the session: it leaves the stack with one worker."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import openai
import psutil
import pytest

from kvpool import block_keys
from tests.e2e.conftest import MODEL_NAME, Stack
from tests.e2e.pool_helpers import BLOCK, complete, metrics, pool_of, prompt

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class LongStream:
    """A long chat stream through the gateway, read on its own thread."""

    index: int
    worker: str = ""
    chunks: int = 0
    error: openai.APIError | None = None
    finished: bool = False   # the stream ended by itself (not closed by the test)
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, client: openai.OpenAI, close: threading.Event) -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL_NAME, stream=True, temperature=0, max_tokens=1500,
                extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": f"Write a long story #{self.index}."}])
            self.worker = raw.headers["x-beluga-worker"]
            stream = raw.parse()
            for _chunk in stream:
                self.chunks += 1
                self.started.set()
                if close.is_set():
                    stream.close()
                    return
            self.finished = True
        except openai.APIError as exc:
            self.error = exc
        finally:
            self.started.set()
            self.done.set()


def major_faults(pid: int) -> int:
    """Major page faults of a process so far (/proc/PID/stat field 12), -1 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[9])
    except (OSError, IndexError, ValueError):
        return -1


def thread_stats() -> dict[tuple[int, int], tuple[str, int, str, int, int, int]]:
    """Every thread on the machine: (pid, tid) -> (name, CPU ticks, state, core, policy,
    nice), from /proc/PID/task/TID/stat."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, IndexError, ValueError), \
                        open(f"/proc/{pid}/task/{tid}/stat") as f:
                    raw = f.read()
                    name = raw[raw.index("(") + 1:raw.rindex(")")]
                    v = raw[raw.rindex(")") + 2:].split()
                    out[(int(pid), int(tid))] = (name, int(v[11]) + int(v[12]), v[0],
                                                 int(v[36]), int(v[38]), int(v[16]))
    return out


def run_queue_wait_s(pid: int) -> float:
    """Seconds a process's threads have waited on a run queue, runnable but not running
    (/proc/PID/task/*/schedstat, second field)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError), \
                    open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


def victim_stuck(stack: Stack, pid: int, url: str, waited_s: float,
                 errors: list[BaseException], streams: list[LongStream]) -> str:
    """Why the victim has not answered one long prompt: what it is running, and its log
    with every thread's stack of its engine and model runner (SIGUSR1: see
    engine.connector.dump_stacks_on_sigusr1)."""
    engine: list[tuple[psutil.Process, float, int, float]] = []
    threads_before = thread_stats()
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.cmdline()[:1] in (["VLLM::EngineCore"], ["VLLM::Worker"]):
                t = child.cpu_times()
                engine.append((child, t.user + t.system, major_faults(child.pid),
                               run_queue_wait_s(child.pid)))
                child.send_signal(signal.SIGUSR1)
    time.sleep(3)
    threads_after = thread_stats()
    busiest = sorted(((after[1] - threads_before[k][1], k, after)
                      for k, after in threads_after.items() if k in threads_before),
                     reverse=True)[:10]
    # Computing slowly, starved of its core (by the other worker, or by the hypervisor:
    # steal), paging its weights back in (major faults), or blocked: its CPU time and
    # faults over those 3 s, its state and cores, and every core's time tell them apart.
    per_core = psutil.cpu_times_percent(interval=1, percpu=True)
    cpu = ["per-core % (user/system/iowait/steal/idle): " + "; ".join(
               f"{c.user:.0f}/{c.system:.0f}/{c.iowait:.0f}/{c.steal:.0f}/{c.idle:.0f}"
               for c in per_core),
           f"memory: {psutil.virtual_memory()}, swap used {psutil.swap_memory().used}",
           "busiest threads over the 3 s (CPU ticks, pid/tid, name, state, last core, "
           "policy, nice): " + "; ".join(
               f"{d} {k[0]}/{k[1]} {a[0]} {a[2]} core {a[3]} policy {a[4]} nice {a[5]}"
               for d, k, a in busiest)]
    for child, before, faults, waited in engine:
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            cpu.append(f"{child.cmdline()[:1]} pid {child.pid}: {t.user + t.system - before:.2f}"
                       f" s CPU, {run_queue_wait_s(child.pid) - waited:.2f} s runnable but"
                       f" waiting (all threads) and {major_faults(child.pid) - faults} major"
                       f" faults in 3 s, status {child.status()}, cores"
                       f" {child.cpu_affinity()}, threads {child.num_threads()}; its running"
                       f" threads: " + ", ".join(
                           f"{k[1]} {a[0]} core {a[3]} policy {a[4]} nice {a[5]}"
                           for k, a in threads_after.items()
                           if k[0] == child.pid and a[2] == "R"))
    try:
        running = [ln for ln in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
                   if ln.startswith(("vllm:num_requests", "vllm:kv_cache_usage",
                                     "beluga_worker_"))]
    except httpx.HTTPError as exc:
        running = [f"/metrics failed: {exc!r}"]
    port = url.rsplit(":", 1)[1]
    log = stack.state_dir / "logs" / f"worker-{port}.vllm.log"
    tail = log.read_text(errors="replace").splitlines()[-300:] if log.is_file() else []
    return "\n".join([f"the victim never answered a long prompt in {waited_s:.0f} s; "
                      f"saver error: {errors!r}; streams: {streams}", *cpu, *running, *tail])


def test_sigkill_a_worker_mid_traffic(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)
    workers = stack.workers()
    assert len(workers) == 2

    # Long streams first; the victim is a worker that is sending at least one of them.
    close_streams = threading.Event()
    streams = [LongStream(i) for i in range(4)]
    readers = [threading.Thread(target=s.run, args=(client, close_streams), daemon=True)
               for s in streams]
    for r in readers:
        r.start()
    for s in streams:
        assert s.started.wait(120) and s.error is None and s.chunks > 0, s
    by_worker = {w.id: sum(s.worker == w.id for s in streams) for w in workers}
    victim = max(workers, key=lambda w: by_worker[w.id])
    survivor = next(w for w in workers if w.id != victim.id)
    victim_procs = [psutil.Process(victim.pid)] + psutil.Process(victim.pid).children(
        recursive=True)
    started = threading.Event()
    victim_url = stack.worker_urls[[w.id for w in workers].index(victim.id)]
    survivor_url = stack.worker_urls[[w.id for w in workers].index(survivor.id)]

    # Long, distinct prompts straight at the victim: it is prefilling and saving blocks into
    # the pool, one save per step, when the SIGKILL lands.
    sent: list[list[int]] = []
    stop_saving = threading.Event()
    answered = threading.Event()
    saver_error: list[BaseException] = []
    t_saving = time.monotonic()

    def keep_saving() -> None:
        i = 0
        while not stop_saving.is_set():
            ids = prompt((41 + 97 * i) % 3000, 1200 + 13 * (i % 50))
            sent.append(ids)
            i += 1
            try:
                complete(victim_url, ids, max_tokens=1)
            except Exception as exc:  # noqa: BLE001 - the victim dies under it
                saver_error.append(exc)
                return
            answered.set()  # its blocks were saved before the answer left (wait_for_save)

    def ask(i: int) -> tuple[str, str]:
        started.set()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=30)
        return raw.headers["x-beluga-worker"], raw.parse().choices[0].message.content or ""

    saver = threading.Thread(target=keep_saving, daemon=True)
    saver.start()
    # (Not the saved-blocks counter: the victim's streams fill and save blocks too.)
    if not answered.wait(120):
        pytest.fail(victim_stuck(stack, victim.pid, victim_url, time.monotonic() - t_saving,
                                 saver_error, streams))
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(ask, i) for i in range(12)]
        started.wait(10)
        time.sleep(0.3)
        assert not any(s.done.is_set() for s in streams if s.worker == victim.id), \
            "a stream on the victim ended before the kill"
        at_kill = {s.index: s.chunks for s in streams}
        os.killpg(victim.pid, signal.SIGKILL)  # the worker, its vLLM server and engine
        stop_saving.set()
        results = [f.result() for f in futures]
    saver.join(30)

    assert all("Paris" in text for _, text in results), results
    # The victim's streams end with an error event the SDK raises, naming what happened;
    # the survivor's go on streaming (or have already finished, untouched).
    for s in streams:
        if s.worker == victim.id:
            assert s.done.wait(60), "a stream from the dead worker hangs"
            assert s.error is not None and not s.finished, s
            assert "failed mid-stream" in s.error.message, s.error.message
    deadline = time.monotonic() + 60
    for s in streams:
        if s.worker == survivor.id:
            while s.chunks < at_kill[s.index] + 10 and not s.done.is_set():
                assert time.monotonic() < deadline, "a survivor's stream stalled"
                time.sleep(0.1)
            assert s.error is None, s.error
    close_streams.set()
    for r in readers:
        r.join(60)
    _gone, alive = psutil.wait_procs(victim_procs, timeout=10)
    assert not alive
    # After the kill, new requests all land on the survivor.
    for _ in range(3):
        worker, text = ask(0)
        assert worker == survivor.id and "Paris" in text
    deadline = time.monotonic() + 15
    while len(stack.workers()) != 1:  # the dead worker's registry entry expires (TTL)
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert stack.proc.poll() is None, "beluga up must survive a worker crash"

    # The pool after the crash: nothing half-written or pinned by the dead processes, and
    # every block the victim published is intact (get() checks each block's checksum).
    with pool_of(stack) as pool:
        pool.sweep()
        st = pool.stats()
        assert st.writing_slots == 0 and st.pinned_slots == 0, st
        published = 0
        for ids in sent:
            keys = block_keys(ids, BLOCK, pool.fingerprint)
            n = pool.lookup_prefix(keys)
            assert len(pool.get(keys)) == n
            published += n
        assert published > 0, (len(sent), st)
    # ... and the survivor loads them: its answer is the one it gives from its own cache.
    ids = sent[0]
    before = metrics(survivor_url)
    first = complete(survivor_url, ids)
    after = metrics(survivor_url)
    assert (after["beluga_worker_prompt_tokens_total:pool"]
            - before["beluga_worker_prompt_tokens_total:pool"]) > 0
    assert complete(survivor_url, ids) == first
