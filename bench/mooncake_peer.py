"""Mooncake Store as its users run it: `mooncake_master` with its embedded HTTP metadata
server, one storage process that mounts a memory segment, and client processes that put and
get through the transfer engine over TCP (loopback). Optional: needs
`pip install -r requirements/bench.txt` and Debian's libibverbs1 + librdmacm1.

Clients use the zero-copy path Mooncake recommends (`register_buffer` + `put_from` /
`get_into`) with the same block sizes and process counts as the Beluga runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

unavailable_reason = ""
MiB = 1024 * 1024
NETNS_MARK = "MOONCAKE_BENCH_ISOLATED"
# Mooncake's transfer engine refuses loopback and picks the first "LAN" interface. So the
# benchmark runs in a private network namespace of its own whose only other interface is a
# veth pair with a made-up address: no byte leaves this machine's loopback-like sandbox.
NETNS_SETUP = ("ip link set lo up && ip link add bel0 type veth peer name bel1 && "
               "ip addr add 10.213.0.1/24 dev bel0 && ip link set bel0 up && "
               "ip link set bel1 up && exec \"$@\"")


def reexec_isolated() -> None:
    """Re-run this command inside a private network namespace (root + unshare + ip)."""
    global unavailable_reason
    if os.environ.get(NETNS_MARK) == "1":
        return
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        unavailable_reason = ("Mooncake needs a private network namespace here "
                              "(root, unshare and ip); run as root or pass --no-mooncake")
        return
    env = dict(os.environ, **{NETNS_MARK: "1", "GLOG_minloglevel": "2"})
    os.execvpe("unshare", ["unshare", "--net", "--", "sh", "-c", NETNS_SETUP, "sh",
                           sys.executable, *sys.argv], env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class Mooncake:
    def __init__(self, master: subprocess.Popen[bytes], storage: subprocess.Popen[str],
                 rpc_port: int, http_port: int, workdir: Path) -> None:
        self.master, self.storage = master, storage
        self.rpc_port, self.http_port, self.workdir = rpc_port, http_port, workdir

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.rpc_port}", f"http://127.0.0.1:{self.http_port}/metadata"]

    def bench(self, size: int, procs: int, iters: int) -> dict[str, Any]:
        start_at = time.time() + 2.0 + 0.5 * procs
        cmds = [[sys.executable, __file__, "client", *self.endpoints, str(size), str(iters),
                 str(r), str(start_at), str(time.time_ns())] for r in range(procs)]
        ps = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in cmds]
        outs = []
        for p in ps:
            out, _ = p.communicate(timeout=900)
            if p.returncode != 0:
                raise RuntimeError("mooncake client failed")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        result: dict[str, Any] = {}
        for op in ("put", "get"):
            lat = sorted(x for o in outs for x in o[op]["lat"])
            total = sum(o[op]["bytes"] for o in outs)
            wall = max(o[op]["wall"] for o in outs)
            result[op] = {"gbps": total / wall / 1e9, "p50_us": lat[len(lat) // 2] * 1e6,
                          "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6}
        return result

    def stop(self) -> None:
        for p in (self.storage, self.master):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(segment_bytes: int = 4096 * MiB) -> Mooncake | None:
    """Start master + storage; None (with `unavailable_reason` set) if Mooncake can't run."""
    global unavailable_reason
    master_bin = shutil.which("mooncake_master") or str(Path(sys.executable).parent /
                                                        "mooncake_master")
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        unavailable_reason = f"mooncake-transfer-engine-non-cuda not importable: {exc}"
        return None
    if not os.path.exists(master_bin):
        unavailable_reason = "mooncake_master not found"
        return None
    rpc_port, http_port = _free_port(), _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="mooncake-bench-"))
    master_log = open(workdir / "master.log", "wb")  # noqa: SIM115 - owned by the child
    master = subprocess.Popen(
        [master_bin, f"--rpc_port={rpc_port}", "--enable_http_metadata_server=true",
         "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={http_port}",
         "--default_kv_lease_ttl=100"],
        stdout=master_log, stderr=subprocess.STDOUT)
    master_log.close()
    if not (_wait_port(rpc_port, 15) and _wait_port(http_port, 15)):
        master.kill()
        unavailable_reason = f"mooncake_master did not start (see {workdir}/master.log)"
        return None
    endpoints = [f"127.0.0.1:{rpc_port}", f"http://127.0.0.1:{http_port}/metadata"]
    storage = subprocess.Popen([sys.executable, __file__, "storage", *endpoints,
                                str(segment_bytes)], stdout=subprocess.PIPE, text=True)
    assert storage.stdout is not None
    line = storage.stdout.readline().strip()
    if line != "ready":
        storage.kill()
        master.kill()
        unavailable_reason = f"Mooncake storage process failed to set up: {line!r}"
        return None
    return Mooncake(master, storage, rpc_port, http_port, workdir)


def _setup(master: str, metadata: str, segment: int, local_buffer: int) -> Any:
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup(f"127.0.0.1:{_free_port()}", metadata, segment, local_buffer, "tcp", "",
                     master)
    if rc != 0:
        raise RuntimeError(f"mooncake setup failed: {rc}")
    return store


def _storage(master: str, metadata: str, segment: int) -> None:
    store = _setup(master, metadata, segment, 16 * MiB)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        store.close()


def _client(master: str, metadata: str, size: int, iters: int, rank: int, start_at: float,
            tag: str) -> None:
    import ctypes

    store = _setup(master, metadata, 0, 64 * MiB)
    buf = (ctypes.c_char * size)()
    ctypes.memmove(buf, os.urandom(size), size)
    addr = ctypes.addressof(buf)
    if store.register_buffer(addr, size) != 0:
        raise RuntimeError("register_buffer failed")
    keys = [f"b-{tag}-{rank}-{i}" for i in range(iters)]
    out: dict[str, Any] = {}
    while time.time() < start_at:
        time.sleep(0.0005)
    for op in ("put", "get"):
        lat: list[float] = []
        t0 = time.perf_counter()
        for k in keys:
            s = time.perf_counter()
            rc = store.put_from(k, addr, size) if op == "put" else store.get_into(k, addr, size)
            # A full segment (objects of earlier rounds still under their read lease, which
            # remove() does not cut short): wait for the master to free them, untimed.
            waited = 0
            while op == "put" and rc != 0 and waited < 100:
                time.sleep(0.1)
                waited += 1
                s = time.perf_counter()
                rc = store.put_from(k, addr, size)
            if (op == "put" and rc != 0) or (op == "get" and rc != size):
                raise RuntimeError(f"mooncake {op} failed: {rc}")
            lat.append(time.perf_counter() - s)
        out[op] = {"lat": lat, "bytes": size * iters, "wall": time.perf_counter() - t0}
    for k in keys:
        store.remove(k)
    store.unregister_buffer(addr)
    store.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "storage":
        _storage(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        _client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
                float(sys.argv[7]), sys.argv[8])
