"""What run.sh checks before any interpreter of the archive starts, and the signature over it.

Every regular file of the archive, ``env/`` included, is listed with its sha256 in ``kit-pack.sha256``
(coreutils ``sha256sum`` format, paths relative to the archive folder), and every symlink with its target
in ``kit-pack.links`` (``path<TAB>target``). run.sh checks both with coreutils alone, refuses any file that
is not listed (an added ``.pth`` or ``__pycache__/*.pyc`` runs code at interpreter start), and only then
runs ``conda-unpack`` or Python::

    kit-pack.sha256       "<sha256>  <path>" for every regular file but itself and its signature
    kit-pack.sha256.sig   the raw 64-byte Ed25519 signature of kit-pack.sha256 (``openssl pkeyutl -rawin``)
    kit-pack.links        "<path>\\t<target>" for every symlink

The signature is checked against public keys the operator provides (``KIT_TRUST``, a file; default
``/etc/kit/trusted_keys`` when present), never against a key inside the archive. Beside the archive,
``<archive>.sha256`` and ``<archive>.sha256.sig`` let an operator check the whole archive, run.sh
included, before extracting it. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from kit._io import atomic_write_bytes, read_capped, sha256_file
from kit.errors import PackError, SignatureError
from kit.pack._tar import TarMember
from kit.signing import SigningKey, Trust

SUMS = "kit-pack.sha256"
SUMS_SIG = "kit-pack.sha256.sig"
LINKS = "kit-pack.links"
# Written by run.sh on the server (conda): the env's hashes right after conda-unpack, and their MAC under a
# host-local key with the folder they were taken in. Never packed: run.sh refuses an archive holding them.
RUNTIME_FILES = ("env/.kit-unpacked", "env/.kit-unpacked.sha256")
# Where the ship steps expect the packer's public key on the server: one PEM key (openssl -inkey reads one).
SERVER_TRUST = "/etc/kit/packer.pem"


def _relative(arcname: str, stem: str) -> str:
    if not arcname.startswith(stem + "/"):
        raise PackError(f"archive entry {arcname!r} is outside the archive folder {stem}/.")
    rel = arcname[len(stem) + 1:]
    if any(c in rel for c in "\n\t\\") or not rel:
        raise PackError(f"{rel!r} has a newline, tab or backslash in its name, which run.sh's sha256sum check "
                        "cannot list. Rename or remove that file in the environment and pack again.")
    if rel in RUNTIME_FILES or any(rel.startswith(r + ".") for r in RUNTIME_FILES):
        raise PackError(f"{rel} is in the environment: it is the record run.sh writes on a server after "
                        "conda-unpack, so this environment was taken from an unpacked archive, and run.sh refuses "
                        "an archive holding it. Pack the original environment, or delete that file and pack again.")
    return rel


def sums_text(hashes: Mapping[str, str], stem: str) -> bytes:
    """``kit-pack.sha256``: one ``sha256sum`` line per regular file (archive names -> relative paths)."""
    lines = sorted(f"{h}  {_relative(a, stem)}\n" for a, h in hashes.items())
    return "".join(lines).encode("utf-8", "surrogateescape")


def links_text(links: Mapping[str, str], stem: str) -> bytes:
    """``kit-pack.links``: ``path<TAB>target`` per symlink."""
    out = []
    for a, target in sorted(links.items()):
        if any(c in target for c in "\n\t"):
            raise PackError(f"symlink {a} points at {target!r}, whose name run.sh cannot check; remove it.")
        out.append(f"{_relative(a, stem)}\t{target}\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def write_layer_digests(layer: Path, hashes: Mapping[str, str], links: Mapping[str, str]) -> None:
    """Keep a cached environment layer's hashes beside it (a reused layer is not read again)."""
    atomic_write_bytes(digests_path(layer), json.dumps({"files": dict(hashes), "links": dict(links)}).encode())


def read_layer_digests(layer: Path) -> tuple[dict[str, str], dict[str, str]] | None:
    try:
        d = json.loads(digests_path(layer).read_text())
        return dict(d["files"]), dict(d["links"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a layer cached before hashes were kept: written again


def digests_path(layer: Path) -> Path:
    return layer.with_name(layer.name + ".sha256.json")


def add_to_archive(member: TarMember, stem: str, env_files: dict[str, str], env_links: dict[str, str],
                   signer: SigningKey | None) -> int:
    """Add kit-pack.links, kit-pack.sha256 (every file, env/ included) and its signature; returns the count."""
    links = {a: t for a, t in env_links.items() if a not in member.hashes}
    links.update(member.links)
    member.add_bytes(f"{stem}/{LINKS}", links_text(links, stem))
    files = {a: h for a, h in env_files.items() if a not in member.links}
    files.update(member.hashes)
    sums = sums_text(files, stem)
    member.add_bytes(f"{stem}/{SUMS}", sums)
    if signer is not None:
        member.add_bytes(f"{stem}/{SUMS_SIG}", signer.sign(sums))
    return len(files)


def sign_archive(archive: Path, signer: SigningKey | None) -> None:
    """``<archive>.sha256`` (sha256sum format) and, with a key, ``<archive>.sha256.sig``: what an operator
    checks with openssl and sha256sum before extracting (run.sh itself included)."""
    line = f"{sha256_file(archive)}  {archive.name}\n".encode()
    atomic_write_bytes(archive.with_name(archive.name + ".sha256"), line)
    sig = archive.with_name(archive.name + ".sha256.sig")
    if signer is not None:
        atomic_write_bytes(sig, signer.sign(line))
    else:
        sig.unlink(missing_ok=True)


def check_archive(archive: Path, f: BinaryIO, trust: Trust) -> str:
    """What the ship steps check, in Python: ``<archive>.sha256`` signed (raw Ed25519, its bytes read once)
    by a key in ``trust``, naming this archive, and the sha256 of the open archive ``f`` (read to its end;
    the caller seeks back and extracts from the same open file). Returns the key id."""
    fix = (f"Do not extract it: get {archive.name} and the two files beside it again from where it was packed, "
           "or trust the packer's key (`kit keys show` there).")
    try:
        line = read_capped(archive.with_name(archive.name + ".sha256"), 4096)
        sig = read_capped(archive.with_name(archive.name + ".sha256.sig"), 4096)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{archive.name} cannot be checked before extracting: {exc}. {fix}", key_id=None) from exc
    key_id = next((k.key_id for k in trust.keys if len(sig) == 64 and k.verify(sig, line)), None)
    if key_id is None:
        raise SignatureError(f"{archive.name}.sha256 is not signed by a trusted key (trusted: "
                             f"{', '.join(trust.key_ids) or 'none'}). {fix}", key_id=None)
    want, _, name = line.decode("utf-8", "replace").rstrip("\n").partition("  ")
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    if name != archive.name or h.hexdigest() != want:
        raise PackError(f"{archive} is not the archive its signed {archive.name}.sha256 names ({name}, sha256 "
                        f"{want[:16]}..., this file {h.hexdigest()[:16]}...): it was changed after packing. {fix}")
    return key_id


def ship_steps(archive_name: str, root: str, trust: str = SERVER_TRUST) -> list[str]:
    """The commands an operator runs on the server, in the folder holding the archive and the two files
    beside it: the archive's signature (openssl, against the packer's PEM key at ``trust``, put there out of
    band) and its sha256 are checked *before* tar extracts anything, then run.sh starts with the same key as
    ``KIT_TRUST``. ``kit pack`` prints them; a test runs exactly these lines."""
    q = shlex.quote
    a = q(archive_name)
    return [
        f"openssl pkeyutl -verify -pubin -inkey {q(trust)} -rawin -in {a}.sha256 -sigfile {a}.sha256.sig",
        f"sha256sum --strict -c {a}.sha256",
        "tar --zstd -xf " + a if archive_name.endswith(".tar.zst") else f"tar xzf {a}",
        f"KIT_TRUST={q(trust)} {q(root + '/run.sh')}",
    ]


def ship_text(archive: Path, root: str, key_id: str | None) -> str:
    """What ``kit pack`` prints after packing: where the key comes from, then :func:`ship_steps` joined by
    ``&&`` (each step runs only when the one before passed)."""
    if key_id is None:
        return ("note: this archive is not signed (no signing key): a server cannot tell it from one changed on "
                "the way. Pack where `kit keys` has a key.")
    steps = ship_steps(archive.name, root)
    return "\n".join([
        f"ship it: copy {archive.name} with its .sha256 and .sha256.sig; once per server, put the packer's public key"
        f" there out of band: `kit keys show {key_id} --pem` (here) > {SERVER_TRUST} (there). Then, on the server:",
        "  " + " \\\n    && ".join(steps),
    ])
