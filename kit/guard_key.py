"""The service's guard key: the one credential a running service holds, with a narrow authority.

A generated service folder holds ``guard.key`` (an Ed25519 private key, PKCS#8 PEM, mode 0600), made when
the service is generated (:func:`kit.servicegen.generate`) or, for a folder generated before it existed,
by the first worker that needs it. Every worker of every instance started from that folder (or from an
archive packed from it) holds the same key. It is used for two things, and only these:

- the canary guard's per-worker window files (:mod:`kit.serving.guard`) carry an HMAC-SHA256 under a key
  derived from it (:func:`window_mac_key`), so a registry writer without it cannot forge, alter, move or
  replay evidence between canaries, serials or workers;
- the guard's own traffic moves (ending a canary, stepping it along the plan a person signed) are signed
  with it (``signer=`` of :func:`kit.traffic.guard_stop` / :func:`kit.traffic.guard_step`); what the
  registry lets that key do is decided there, never by the service.

It is not a registry signing key: it never signs a version, a gate result or an archive.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from kit.errors import SigningKeyError
from kit.signing import SigningKey

log = logging.getLogger(__name__)

GUARD_KEY_FILE = "guard.key"
_MAC_INFO = b"kit guard window files v1"


def guard_key_path(service_dir: Path | str) -> Path:
    """Where a service folder keeps its guard key: ``<service_dir>/guard.key``."""
    return Path(service_dir) / GUARD_KEY_FILE


def load_or_create_guard_key(service_dir: Path | str) -> SigningKey:
    """The service's guard key, made (0600, atomically: a reader never sees half a key) when absent.

    Workers that start together may race to make it: the first link wins and the others load that one.
    Raises :class:`SigningKeyError` naming the file when it cannot be read or made.
    """
    path = guard_key_path(service_dir)
    if not path.exists():
        _create(path)
    try:
        st = path.lstat()
    except OSError as exc:
        raise SigningKeyError(f"The guard key {path} cannot be read ({exc}). Regenerate the service "
                              "(kit service new --force) or make the folder readable to the service.") from exc
    if not _is_regular(st.st_mode):
        raise SigningKeyError(f"The guard key {path} is not a regular file (a link or something else). Remove "
                              "it and regenerate the service (kit service new --force).")
    if st.st_mode & 0o077:
        raise SigningKeyError(f"The guard key {path} is readable by others (mode {st.st_mode & 0o777:o}); "
                              f"make it private: chmod 600 {path}.")
    return SigningKey.load(path)


def window_mac_key(key: SigningKey) -> bytes:
    """The HMAC-SHA256 key of the guard's window files, derived from the guard key (never the key itself)."""
    return hmac.new(key._private, _MAC_INFO, hashlib.sha256).digest()


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _create(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise SigningKeyError(f"Cannot make the guard key {path} ({exc}). Make the service folder writable, "
                              "or regenerate the service (kit service new --force).") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another worker made it first: theirs stands
            log.info("made the service's guard key %s", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["GUARD_KEY_FILE", "guard_key_path", "load_or_create_guard_key", "window_mac_key"]
