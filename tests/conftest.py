"""Fixtures shared by more than one test package."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer

REDIS_PASSWORD = "s3cret-pass"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server for one test (tests may stop and start it: an outage)."""
    s = RedisServer().start()
    yield s
    s.stop()


class ConfiguredRedis(RedisServer):
    """A private redis-server started with extra arguments (a password, TLS); `url` is how a
    client reaches it (credentials and CA included), `port_args` replace `--port <port>`."""

    def __init__(self, url: str, port_args: list[str], extra_args: list[str],
                 log: Path) -> None:
        super().__init__()
        self.ca: Path | None = None  # the CA certificate of a TLS server
        self.url = url.format(port=self.port)
        self.port_args = [a.format(port=self.port) for a in port_args]
        self.extra_args = extra_args
        self.log: Path | None = log


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[ConfiguredRedis]:
    """A private redis-server that requires a password (`--requirepass`); its `url` carries
    it: redis://:<password>@127.0.0.1:<port>/0."""
    s = ConfiguredRedis(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{{port}}/0",
                        ["--port", "{port}"], ["--requirepass", REDIS_PASSWORD],
                        tmp_path / "redis-password.log").start()
    yield s
    s.stop()


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl CLI):
    (CA certificate, server certificate, server key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is missing (needed to make a test certificate)")
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    crt, key, csr, ext = (folder / "server.crt", folder / "server.key", folder / "server.csr",
                          folder / "server.ext")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=beluga-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
         "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out",
         crt, "-days", "2", "-extfile", ext],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    return ca, crt, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[ConfiguredRedis]:
    """A private redis-server on TLS only (`--port 0 --tls-port P`), with a password; its
    `url`: rediss://:<password>@127.0.0.1:<port>/0?ssl_ca_certs=<the test CA>. `ca`: the CA
    certificate's path. Skipped where redis-server was built without TLS."""
    ca, crt, key = make_tls_files(tmp_path / "tls")
    s = ConfiguredRedis(
        f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{{port}}/0?ssl_ca_certs={ca}",
        ["--port", "0", "--tls-port", "{port}"],
        ["--tls-cert-file", str(crt), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(ca), "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD],
        tmp_path / "redis-tls.log")
    s.ca = ca
    try:
        s.start()
    except RuntimeError as exc:  # a build without TLS refuses the tls-* options at once
        text = str(exc).lower()
        if "tls" in text and ("support" in text or "build" in text):
            pytest.skip(f"this redis-server does not support TLS: {exc}")
        raise
    yield s
    s.stop()
