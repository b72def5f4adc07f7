"""Checks ``run.sh`` runs on the server, inside the unpacked environment, before starting the service.

``python -m kit.pack verify ROOT`` (after run.sh has checked every file with sha256sum, before any
interpreter ran) re-hashes the service, models and run.sh against ``kit-pack.json``, re-verifies each model
version against its ``meta.json`` and its signature by a key in ``service/service.toml`` ``[trust]``,
compares the environment's fingerprint with the one recorded when it was packed, and makes sure ``kit``
is imported from the packed environment. It imports only the standard library and light parts of kit
(no torch, no serving).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit._io import sha256_file
from kit.errors import IntegrityError, KitError, PackError

MANIFEST = "kit-pack.json"
# What must be equal for "the environment that runs is the environment that was packed".
_ENV_FIELDS = ("python", "implementation", "platform", "torch", "distributions_sha256")


@dataclass(frozen=True)
class RuntimeCheck:
    files: int
    models: tuple[str, ...]
    env_summary: str


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PackError(f"{path} is missing: {root} is not an unpacked kit archive. Extract the archive "
                        "again and run its run.sh.") from exc
    except ValueError as exc:
        raise PackError(f"{path} is not valid JSON ({exc}); extract the archive again.") from exc
    if not isinstance(data, dict) or data.get("format") != "kit-pack":
        raise PackError(f"{path} is not a kit pack manifest (format {data.get('format')!r}).")
    return data


def check_files(root: Path, manifest: dict[str, Any]) -> int:
    bad = []
    for rel, expected in sorted(manifest["files"].items()):
        p = Path(root) / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif sha256_file(p) != expected:
            bad.append(f"{rel}: sha256 differs from the packed file")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise IntegrityError(f"{len(bad)} shipped file(s) do not match the archive's manifest: {shown}. "
                             "The files were changed after packing; extract the archive again.")
    return len(manifest["files"])


def check_models(root: Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    from kit.registry import Registry

    reg = Registry(Path(root) / "registry", require_gate=True, user="run.sh", keyring=_service_trust(Path(root)))
    refs = []
    for name, m in sorted(manifest["models"].items()):
        for v in m["versions"]:
            (res,) = reg.verify(name, int(v))
            if not res.ok:
                raise IntegrityError(f"model {res.ref} in {root}/registry failed verification: "
                                     f"{'; '.join(res.problems)}. Extract the archive again.")
            refs.append(res.ref)
    return tuple(refs)


def _service_trust(root: Path) -> Any:
    """The keyring of ``[trust] public_keys`` in the packed service.toml (None: signatures not checked)."""
    from kit.service_settings import read_service_toml
    from kit.signing import Keyring, Trust

    keys = read_service_toml(root / "service", error=PackError).get("trust", {}).get("public_keys", ())
    return Keyring.verify_only(Trust.from_texts(keys, "service.toml [trust] public_keys")) if keys else None


def check_env(root: Path, manifest: dict[str, Any]) -> str:
    import kit._version
    from kit.env import Fingerprint, fingerprint

    env_dir = (Path(root) / "env").resolve()
    kit_file = Path(kit._version.__file__).resolve()
    if env_dir not in kit_file.parents:
        raise PackError(f"kit is imported from {kit_file}, not from the packed environment {env_dir}. "
                        "Something (PYTHONPATH, a .pth file) leads outside the archive; run ./run.sh, "
                        "which clears PYTHONPATH.")
    packed = Fingerprint.from_dict(manifest["env"])
    now = fingerprint(None)
    diffs = [f"{f}: packed {getattr(packed, f)!r}, here {getattr(now, f)!r}"
             for f in _ENV_FIELDS if getattr(packed, f) != getattr(now, f)]
    if diffs:
        dist_diffs = [
            f"{k} {packed.distributions.get(k)} -> {now.distributions.get(k)}"
            for k in sorted(set(packed.distributions) | set(now.distributions))
            if packed.distributions.get(k) != now.distributions.get(k)
        ]
        raise PackError("the unpacked environment is not the one that was packed: " + "; ".join(diffs)
                        + (f" (packages: {', '.join(dist_diffs[:8])})" if dist_diffs else "")
                        + ". Extract the archive again; do not install packages into it.")
    return now.summary()


def verify_unpacked(root: Path) -> RuntimeCheck:
    """All of the checks above, for the unpacked archive at ``root``."""
    root = Path(root)
    manifest = read_manifest(root)
    n = check_files(root, manifest)
    models = check_models(root, manifest)
    summary = check_env(root, manifest)
    return RuntimeCheck(n, models, summary)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "verify":
        print("usage: python -m kit.pack verify ROOT", file=sys.stderr)
        return 2
    try:
        res = verify_unpacked(Path(argv[1]))
    except KitError as exc:  # PackError, IntegrityError (SignatureError), a bad [trust] key
        print(f"run.sh: error: {exc}", file=sys.stderr)
        return 1
    print(f"run.sh: verified {res.files} files, models {', '.join(res.models)} (sha256, signatures), "
          f"environment as packed ({res.env_summary})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
