"""Secrets shared by the processes of one deployment.

* The server secret keys tenant cache salts (HMAC-SHA256), so a tenant's cached prefixes are
  reachable only through the gateway that knows both the tenant and the secret. An operator
  sets it (`server_secret`, the same for every gateway); otherwise it is generated once and
  kept in `<state_dir>/secret` (mode 0600), so a restart keeps the pool's tenant blocks
  reachable.
* The worker credential: what a worker requires on vLLM's `/v1` routes and the pool lookup
  endpoint, and what the gateway sends. `beluga up` generates one per run.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from beluga.settings import Settings

SECRET_FILE = "secret"
SECRET_BYTES = 32


class CredentialError(RuntimeError):
    """A secret file that cannot be read, written or trusted."""


def new_token() -> str:
    """A fresh random credential (URL-safe text, 256 bits)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def server_secret(settings: Settings) -> bytes:
    """The operator's `server_secret`, else the one kept under `state_dir` (made once)."""
    if settings.server_secret:
        return settings.server_secret.encode()
    return load_or_create_secret(settings.state_dir / SECRET_FILE).encode()


def load_or_create_secret(path: Path) -> str:
    """The secret in `path`, created (0600, exclusively) when missing. A file that is not a
    regular file of this user's, or that others can read, is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CredentialError(f"cannot create the secret file {path}: {exc}") from None
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(new_token())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise CredentialError(f"cannot read the secret file {path}: {exc}") from None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise CredentialError(f"the secret file {path} must be owned by this user and "
                                  "readable by nobody else (chmod 600)")
        value = fh.read(4096).strip()
    if len(value) < 16:
        raise CredentialError(f"the secret file {path} holds no usable secret (delete it to "
                              "make a new one)")
    return value


def tenant_salt(secret: bytes, tenant: str, client_salt: str | None) -> str:
    """A tenant's cache salt: HMAC(secret, tenant [, the client's own salt]). Without the
    secret, knowing the tenant's name gives nobody its salt."""
    mac = hmac.new(secret, b"beluga-tenant-v2", hashlib.sha256)
    for part in (tenant.encode(), (client_salt or "").encode("utf-8", "surrogatepass")):
        mac.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: unambiguous
    return mac.hexdigest()
