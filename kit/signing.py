"""Ed25519 signatures: who registered a version, who gated it, who packed an archive.

sha256 in ``meta.json`` detects accidents; a signature detects an attacker who can write the registry
but does not hold the key. Kit signs the exact bytes of a file into a detached ``<file>.sig``::

    {"format": "kit-signature", "schema": 1, "alg": "ed25519", "key_id": "3f2a9c...",
     "file": "meta.json", "signature": "<base64 of 64 bytes>"}

Keys live outside the registry and outside every archive, in a key folder (``kit.config``:
``keys_dir``, default ``~/.config/kit/keys``; or one private key file, ``signing_key``)::

    <keys_dir>/<key_id>.pem    private key (PKCS#8 PEM, mode 0600; the folder is 0700)
    <keys_dir>/<key_id>.pub    public key, "ed25519:<base64 of 32 bytes>"
    <keys_dir>/default         the key id that signs

A key id is the first 16 hex digits of the sha256 of the raw public key. Verifiers hold a
:class:`Trust` (public keys only: ``[trust] public_keys`` in ``service.toml``, ``trusted_keys`` in
``kit.toml``); a :class:`Keyring` bundles the signing key (made on first use; parallel first runs sharing
an empty folder end with one key, see :meth:`KeyStore.first`) with that trust.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kit._io import atomic_write_bytes, atomic_write_json, file_mode, fsync_dir, read_capped
from kit.errors import SignatureError, SigningKeyError

log = logging.getLogger(__name__)

ALG = "ed25519"
SIG_SUFFIX = ".sig"
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # DER SubjectPublicKeyInfo of an Ed25519 key


def _key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A public key: ``raw`` is the 32-byte Ed25519 key."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return _key_id(self.raw)

    def text(self) -> str:
        """``ed25519:<base64>``: the form service.toml, kit.toml and ``kit keys show`` use."""
        return f"{ALG}:{base64.b64encode(self.raw).decode()}"

    def pem(self) -> str:
        """SubjectPublicKeyInfo PEM, for ``openssl pkeyutl -verify`` (what run.sh uses)."""
        b64 = base64.b64encode(_SPKI_PREFIX + self.raw).decode()
        return f"-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n"

    @classmethod
    def from_text(cls, text: str, where: str = "a public key") -> PublicKey:
        alg, _, b64 = text.strip().partition(":")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if alg != ALG or len(raw) != 32:
            raise SigningKeyError(f"{where} holds {text[:24]!r}…, not an Ed25519 public key. Write it as "
                                  "`kit keys show` prints it: \"ed25519:<44 base64 characters>\".")
        return cls(raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """A private key read from ``path`` (never copied anywhere else by Kit)."""

    path: Path
    public: PublicKey
    _private: bytes = field(repr=False)  # 32-byte raw private key

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self._private).sign(data)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = Path(path).expanduser()
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise SigningKeyError(f"Signing key {path} does not exist. Make one with `kit keys new`, or point "
                                  "signing_key (kit.toml) / KIT_SIGNING_KEY at your key file.") from exc
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc}). Make a key with "
                                  "`kit keys new`.") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key. Make one with "
                                  "`kit keys new`.")
        raw_priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(path, PublicKey(raw_pub), raw_priv)


@dataclass(frozen=True)
class Trust:
    """The public keys a verifier accepts. Empty: nothing verifies."""

    keys: tuple[PublicKey, ...] = ()

    @classmethod
    def from_texts(cls, texts: Iterable[str], where: str = "the trusted keys") -> Trust:
        return cls(tuple(PublicKey.from_text(t, where) for t in texts))

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self.keys)

    def get(self, key_id: str) -> PublicKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def __add__(self, other: Trust) -> Trust:
        seen = {k.key_id for k in self.keys}
        return Trust(self.keys + tuple(k for k in other.keys if k.key_id not in seen))


# --------------------------------------------------------------------------- signatures


def sig_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + SIG_SUFFIX)


def signature_record(data: bytes, key: SigningKey, file_name: str) -> dict[str, object]:
    return {"format": "kit-signature", "schema": 1, "alg": ALG, "key_id": key.key_id, "file": file_name,
            "signature": base64.b64encode(key.sign(data)).decode()}


def sign_file(path: Path, key: SigningKey, *, data: bytes | None = None) -> Path:
    """Write ``<path>.sig`` (atomically) holding ``key``'s signature of ``path``'s bytes, or of ``data``
    (the bytes the caller checked and wrote: what is signed is what was checked, even if ``path`` changed)."""
    path = Path(path)
    out = sig_path(path)
    atomic_write_json(out, signature_record(path.read_bytes() if data is None else data, key, path.name))
    return out


def signed_by(path: Path) -> str | None:
    """The key id ``<path>.sig`` names (not verified), or None when unsigned or unreadable."""
    try:
        rec = json.loads(sig_path(path).read_text())
        return str(rec["key_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_bytes(data: bytes, sig_file: Path, trust: Trust, what: str, fix: str) -> str:
    """Check ``sig_file`` signs ``data`` with a trusted key; returns the key id.

    Raises :class:`SignatureError` naming ``what``, the key id and ``fix`` (the next step) when the
    signature is missing, unreadable, by an untrusted key, or does not match.
    """
    try:
        sig_data = read_signature(sig_file)
    except FileNotFoundError as exc:
        raise SignatureError(f"{what} is not signed ({Path(sig_file).name} is missing); "
                             f"trusted keys: {', '.join(trust.key_ids) or 'none'}. {fix}", key_id=None) from exc
    except (OSError, ValueError) as exc:  # unreadable, not a regular file, or over the size cap
        raise SignatureError(f"{what}: the signature {sig_file} is unreadable ({exc}). {fix}", key_id=None) from exc
    return verify_signature(data, sig_data, trust, what, fix, where=str(sig_file))


_MAX_SIG_BYTES = 64 << 10  # a signature record is ~250 bytes


def read_signature(sig_file: Path) -> bytes:
    """The bytes of a ``.sig`` file, read once and size-capped (``FileNotFoundError`` when absent,
    ``ValueError`` when over the cap or not a regular file)."""
    return read_capped(Path(sig_file), _MAX_SIG_BYTES)


def verify_signature(data: bytes, sig_data: bytes, trust: Trust, what: str, fix: str, *, where: str) -> str:
    """Check the signature record ``sig_data`` (a ``.sig`` file's bytes, read by the caller) signs ``data``
    with a trusted key; returns the key id. ``where`` names the signature file in messages.

    Callers that must use exactly what was verified read both files once and pass the bytes here.
    """
    trusted = ", ".join(trust.key_ids) or "none"
    try:
        rec = json.loads(sig_data)
    except ValueError as exc:
        raise SignatureError(f"{what}: the signature {where} is unreadable ({exc}). {fix}", key_id=None) from exc
    try:
        key_id = str(rec["key_id"])
        sig = base64.b64decode(str(rec["signature"]), validate=True)
        if rec.get("alg") != ALG:
            raise ValueError(f"algorithm {rec.get('alg')!r}")
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise SignatureError(f"{what}: the signature {where} is malformed ({exc}). {fix}", key_id=None) from exc
    pub = trust.get(key_id)
    if pub is None:
        raise SignatureError(f"{what} is signed by key {key_id}, which is not trusted here (trusted keys: "
                             f"{trusted}). {fix}", key_id=key_id)
    if not pub.verify(sig, data):
        raise SignatureError(f"{what} does not match its signature by key {key_id}: it was changed after it "
                             f"was signed, by someone without that key. {fix}", key_id=key_id)
    return key_id


def verify_file(path: Path, trust: Trust, what: str, fix: str) -> str:
    """:func:`verify_bytes` for ``path`` and its ``<path>.sig``."""
    return verify_bytes(Path(path).read_bytes(), sig_path(path), trust, what, fix)


# --------------------------------------------------------------------------- the key folder


class KeyStore:
    """A folder of key pairs (see the module docstring). Private keys never leave it."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"KeyStore({str(self.root)!r})"

    def new(self, *, make_default: bool = True) -> SigningKey:
        """Make a key pair (private key 0600 in a 0700 folder); returns it. It becomes the default key when
        ``make_default`` or when the folder has none."""
        key = self._write_pair()
        if make_default:
            atomic_write_bytes(self.root / "default", (key.key_id + "\n").encode())
        else:
            self._claim_default(key.key_id)
        return key

    def first(self) -> tuple[SigningKey, bool]:
        """The default key, made when the folder has none; True when this call made it.

        Parallel first runs sharing an empty folder each make a pair, but exactly one becomes the default
        (``default`` is created by a hard link, which fails when it exists); the others delete theirs and
        return the winner's key, so every process signs with the same key and one key file stays."""
        key = self.default()
        if key is not None:
            return key, False
        mine = self._write_pair()
        winner = self._claim_default(mine.key_id)
        if winner == mine.key_id:
            return mine, True
        for path in (mine.path, self.root / f"{mine.key_id}.pub"):
            path.unlink(missing_ok=True)
        log.info("another process made signing key %s first; removed %s", winner, mine.path)
        return SigningKey.load(self.root / f"{winner}.pem"), False

    def _write_pair(self) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        pub = PublicKey(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        priv_path = self.root / f"{pub.key_id}.pem"
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_bytes(self.root / f"{pub.key_id}.pub", (pub.text() + "\n").encode())
        log.info("made signing key %s at %s", pub.key_id, priv_path)
        return SigningKey.load(priv_path)

    def _claim_default(self, key_id: str) -> str:
        """Make ``key_id`` the default unless the folder has one; returns the default's id. The id is written
        whole to a temporary file, then hard-linked to ``default`` (an atomic create-if-absent). An empty
        ``default`` (written by hand) is replaced, as before."""
        target = self.root / "default"
        tmp = self.root / f".default.{key_id}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())  # as atomic_write_bytes
        try:
            with os.fdopen(fd, "wb") as f:
                f.write((key_id + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                winner = self.default_id()
                if winner is not None:
                    return winner
                os.replace(tmp, target)
            fsync_dir(self.root)
            return key_id
        finally:
            tmp.unlink(missing_ok=True)

    def key_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.pub"))

    def public(self, key_id: str) -> PublicKey:
        matches = [k for k in self.key_ids() if k.startswith(key_id)] if key_id else []
        if len(matches) != 1:
            raise SigningKeyError(f"No single key {key_id!r} in {self.root} (have: {', '.join(self.key_ids()) or 'none'}). "
                                  "List keys with `kit keys list`.")
        path = self.root / f"{matches[0]}.pub"
        return PublicKey.from_text(path.read_text(), str(path))

    def has_private(self, key_id: str) -> bool:
        return (self.root / f"{key_id}.pem").is_file()

    def default_id(self) -> str | None:
        try:
            kid = (self.root / "default").read_text().strip()
        except OSError:
            return None
        return kid or None

    def default(self) -> SigningKey | None:
        kid = self.default_id()
        return SigningKey.load(self.root / f"{kid}.pem") if kid else None

    def trust(self) -> Trust:
        return Trust(tuple(self.public(k) for k in self.key_ids()))


class Keyring:
    """What a registry signs with and verifies against.

    Parameters
    ----------
    keys_dir : the key folder; the signing key is its default key, made on first use when ``create``.
    signing_key : a private key file that signs instead (and is trusted).
    trusted : more trusted public keys (``ed25519:...``), e.g. a colleague's or a CI's.
    create : make a key pair in ``keys_dir`` when it has none, the first time something is signed.
    """

    def __init__(self, keys_dir: Path | None = None, *, signing_key: Path | None = None,
                 trusted: Iterable[str] = (), create: bool = True):
        self.store = KeyStore(keys_dir) if keys_dir is not None else None
        self.signing_key_path = Path(signing_key).expanduser() if signing_key else None
        self.extra = Trust.from_texts(trusted)
        self.create = create
        self.created: SigningKey | None = None  # set when this keyring made the project's key
        self._signer: SigningKey | None = None

    @classmethod
    def verify_only(cls, trust: Trust) -> Keyring:
        ring = cls(None, create=False)
        ring.extra = trust
        return ring

    def __repr__(self) -> str:
        return f"Keyring(store={self.store!r}, signing_key={self.signing_key_path}, trusted={self.extra.key_ids})"

    def can_sign(self) -> bool:
        return self.signing_key_path is not None or self.store is not None

    def signer(self) -> SigningKey:
        """The signing key; made in the key folder (and logged) on first use."""
        if self._signer is not None:
            return self._signer
        if self.signing_key_path is not None:
            self._signer = SigningKey.load(self.signing_key_path)
        elif self.store is not None:
            key = self.store.default()
            if key is None:
                if not self.create:
                    raise SigningKeyError(f"No signing key in {self.store.root}. Make one with `kit keys new`.")
                key, made = self.store.first()
                if made:
                    self.created = key
                    log.warning("kit: made a signing key for this project: %s (private key %s, mode 0600; keep "
                                "it out of the registry and back it up). Services trust its public key %s.",
                                key.key_id, key.path, key.public.text())
            self._signer = key
        else:
            raise SigningKeyError("Nothing to sign with: this registry has only public keys (a service's trust). "
                                  "Sign where the key is kept (`kit keys list`).")
        return self._signer

    def service_keys(self) -> tuple[str, ...]:
        """The public keys a service generated from this project trusts (``[trust] public_keys``): the
        signing key's (made on first use) and the extra trusted keys."""
        own = (self.signer().public,) if self.can_sign() else ()
        return tuple(k.text() for k in (Trust(own) + self.extra).keys)

    def trust(self) -> Trust:
        """Every key this keyring accepts: the key folder's public keys, the signing key, ``trusted``."""
        t = self.extra
        if self.store is not None:
            t = self.store.trust() + t
        if self.signing_key_path is not None and self.signing_key_path.is_file():
            t = Trust((self.signer().public,)) + t
        return t
