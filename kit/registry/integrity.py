"""What a registry checks before it trusts a version: every file's sha256, the signature of meta.json,
the gate rule; and loading a version for inference once those pass.

sha256 against meta.json catches accidents; the signature of meta.json (which binds every file's sha256)
catches attackers who can write the registry but do not hold a trusted key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

from kit import evidence as gate_evidence
from kit._io import atomic_write_bytes, sha256_file
from kit._types import JSONObject
from kit.errors import IntegrityError, KitError, ServingError, SignatureError, UnsafeArtifactError
from kit.registry.cache import safe_file_name
from kit.registry.loaded import LoadedModel, VerifiedVersion
from kit.registry.names import validate_version
from kit.registry.records import ModelVersion, VerifyResult, artifact_digest
from kit.registry.store import Store, check_place
from kit.signing import SigningKey, Trust, sig_path, sign_file, verify_bytes
from kit.version_files import ONNX_DATA_FILE, ONNX_FILE, check_backend

log = logging.getLogger(__name__)


class CheckedStore(Store):
    """A :class:`Store` that verifies: sha256 and signatures, loading, gate evidence and the gate rule."""

    def verify(self, name: str | None = None, version: int | None = None) -> list[VerifyResult]:
        """Re-hash every file of the selected versions against meta.json."""
        names = [name] if name else self.models()
        results = []
        for n in names:
            nums = [validate_version(version)] if version is not None else self._version_numbers(n)
            for v in nums:
                results.append(self._verify_one(n, v))
        return results

    def _verify_one(self, name: str, version: int) -> VerifyResult:
        ref = f"{name}@{version}"
        problems = []
        signed_by = None
        try:
            vv = self.verified(name, version)
            mv, signed_by = vv.version, vv.signed_by
        except SignatureError as exc:  # still list the files' problems, from meta.json as it reads now
            problems.append(str(exc))
            try:
                mv = self._read_version(name, version)
            except KitError as exc2:
                return VerifyResult(ref, False, (*problems, str(exc2)))
        except KitError as exc:
            return VerifyResult(ref, False, (str(exc),))
        problems += file_problems(mv)
        return VerifyResult(ref, not problems, tuple(problems), signed_by)

    def trust(self) -> Trust | None:
        """The :class:`kit.signing.Trust` reads check against; None when this registry checks no signatures."""
        return self.keyring.trust() if self.keyring is not None else None

    def verified(self, name: str, ref: int | str | None = None) -> VerifiedVersion:
        """A version read for use: meta.json's bytes read once (size-capped), their signature checked
        against this registry's trust (with a keyring), the ModelVersion parsed from those same bytes, and
        its ``name``/``version`` compared with the folder it sits in.

        Raises :class:`SignatureError` (naming the key and the fix) for an unsigned version, a key not
        trusted here, or a ``meta.json`` changed after it was signed; :class:`IntegrityError` for a
        meta.json signed for another place (a copied version).
        """
        version = self._resolve_number(name, ref)
        data = self._meta_bytes(name, version)
        signed_by = None
        trust = self.trust()
        if trust is not None:
            r = f"{name}@{version}"
            fix = (f"Do not serve it: restore {r} from a copy you trust or register the model again. If "
                   f"you hold the key and its files are yours, re-sign it with `kit keys sign {r}`; if "
                   "another trusted key signed it, add that key's public key to the trusted keys (service.toml "
                   "[trust] public_keys, kit.toml trusted_keys).")
            meta_path = self.version_dir(name, version) / "meta.json"
            signed_by = verify_bytes(data, sig_path(meta_path), trust, f"{r} (its meta.json)", fix)
        return VerifiedVersion(self._parse_meta(name, version, data, bound=True), signed_by, data)

    def check_signature(self, mv: ModelVersion) -> str | None:
        """The key id whose signature of ``mv``'s meta.json verifies (None when this registry has no
        keyring), read once by :meth:`verified`; ``IntegrityError`` when what verifies is not ``mv``."""
        return self._verified_as(mv).signed_by

    def _verified_as(self, mv: ModelVersion) -> VerifiedVersion:
        vv = self.verified(mv.name, mv.version)
        if vv.version.artifact_sha256 != mv.artifact_sha256 or vv.version.files != mv.files:
            raise IntegrityError(f"{mv.ref}'s meta.json changed since it was read (artifact {mv.short_sha} then, "
                                 f"{vv.version.short_sha} now). Read it again and retry; if it keeps changing, "
                                 "someone is rewriting the registry: restore it from a copy you trust.")
        return vv

    def check_integrity(self, mv: ModelVersion) -> str | None:
        """Signature of meta.json, then every file's sha256; returns the verified key id (or None)."""
        vv = self._verified_as(mv)
        problems = file_problems(vv.version)
        if problems:
            raise IntegrityError(
                f"{mv.ref} failed verification: {'; '.join(problems)}. The files were changed after "
                "registration; restore them or register the model again."
            )
        return vv.signed_by

    def sign_version(self, name: str, version: int) -> str:
        """Sign an existing version's meta.json (after checking every file's sha256); returns the key id.

        For versions registered before signing (or without a key). Sign only versions you know are yours.
        """
        if self.keyring is None or not self.keyring.can_sign():
            raise SignatureError(f"This registry has no signing key; sign {name}@{version} where your key is "
                                 "(`kit keys list`).")
        version = self._resolve_number(name, version)
        data = self._meta_bytes(name, version)  # checked, completed and signed from this one read
        mv = self._parse_meta(name, version, data)
        problems = file_problems(mv)
        if problems:
            raise IntegrityError(f"Refusing to sign {mv.ref}: {'; '.join(problems)}.")
        meta = json.loads(data)
        if "name" not in meta or "version" not in meta:  # bind it to its place (older hand-made versions)
            meta.update(name=name, version=version)
            data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        check_place(meta, name, version, mv.path / "meta.json")  # never re-sign a copy for a new place
        key = self.keyring.signer()
        with self.lock(name):
            self._write_signed_meta(name, version, data, key)
            self._event(name, "sign", version=mv.version, key_id=key.key_id,
                        artifact_sha256=mv.artifact_sha256)
        return key.key_id

    def _write_signed_meta(self, name: str, version: int, data: bytes, key: SigningKey) -> None:
        """Store ``data`` as ``name@version``'s meta.json (when it changed) with its signature by ``key``;
        callers hold the model lock (an object-store registry also uploads both)."""
        vdir = self.version_dir(name, version)
        if data != self._meta_bytes(name, version):
            atomic_write_bytes(vdir / "meta.json", data)
        sign_file(vdir / "meta.json", key, data=data)

    def load(self, name: str, ref: int | str | None = None, *, backend: str = "torch", check_env: bool = True,
             max_artifact_bytes: int | None = None, threads: int = 0, device: str = "cpu",
             max_tensor_bytes: int = 0) -> LoadedModel:
        """Load a version for inference: meta.json verified from one read (:meth:`verified`), the
        environment checked for ``backend``, every file copied into the local verified cache while hashed
        (:mod:`kit.registry.cache`), then mapped and parsed from the cache, never from the registry.

        ``backend="torch"``: the exported program (tensors in and out). ``backend="onnxruntime"``: an
        onnxruntime session over ``model.onnx`` (numpy in, a tuple of numpy out; torch is never imported),
        with ``threads`` intra-op threads (0: onnxruntime's default) on ``device`` (``cpu``, ``cuda[:N]``).
        ``max_artifact_bytes`` bounds what opening the artifact may cost (default: kit.backends.checks' 8 GiB);
        ``max_tensor_bytes`` what one tensor the program makes from sizes may hold (0: derived from its size).
        """
        from kit import backends
        from kit.backends.checks import limits_for
        from kit.env import Fingerprint, diff, fingerprint
        from kit.signature import Signature

        check_backend(backend)
        vv = self.verified(name, ref)  # SignatureError first: it names the key and the fix
        mv = vv.version
        if backend == "onnxruntime":
            require_onnx(mv)
        drift = None
        if check_env:
            drift = diff(Fingerprint.from_dict(mv.env), fingerprint(), backend=backend)
            drift.raise_for_errors(f"This environment (for {mv.ref} on backend {backend})")
        limits = limits_for(max_artifact_bytes, max_tensor_bytes)
        # every file copied into the private cache while hashed (one read), then mapped and parsed from there
        files = self.cache.materialize(vv, limits.max_bytes)
        signature = Signature.from_dict(mv.signature)
        impl = backends.get(backend).module()  # the backend's row: kit.backends.pt2.serve, kit.backends.onnx.serve
        return impl.load_version(mv, files, signature, limits, drift=drift, signed_by=vv.signed_by, device=device,
                                 threads=threads)

    def prune_cache(self, names: list[str] | None = None, unused_for_s: float = 86400.0) -> list[Path]:
        """Bound the local verified cache: remove entries of versions no alias of ``names`` (default: every
        model) names — production, canary, the rollback list — and that no load used for ``unused_for_s``."""
        keep = set()
        for n in names if names is not None else self.models():
            try:
                a = self.aliases(n)
                nums = {a.production, a.canary, *getattr(a, "previous", ())} - {None}
                keep |= {self._read_version(n, int(v)).artifact_sha256 for v in nums}
            except KitError as exc:  # an unreadable model keeps its entries until they age out
                log.warning("cache prune: %s", exc)
        return self.cache.prune(keep, unused_for_s)

    # ---- gates (evidence stored beside the version; its format is kit.evidence's)
    def gate_root(self, name: str, version: int) -> Path:
        return gate_evidence.gates_dir(self.version_dir(name, version))

    def gate_results(self, name: str, version: int) -> list[JSONObject]:
        return gate_evidence.read_results(self.version_dir(name, version))

    def passing_gate(self, mv: ModelVersion, backend: str | None = None) -> JSONObject | None:
        """The newest passing gate result recorded for exactly this artifact (on ``backend``, when given), if
        any. With a keyring, only results whose ``result.json.sig`` verifies against its trust count: a
        forged result is no gate."""
        results = self.gate_results(mv.name, mv.version) if self.keyring is None else self._signed_gate_results(mv)
        return gate_evidence.passing_result(results, mv.artifact_sha256, backend)

    def _signed_gate_results(self, mv: ModelVersion) -> list[JSONObject]:
        trust = cast(Trust, self.trust())  # passing_gate calls this only with a keyring
        out: list[JSONObject] = []
        for p in sorted(gate_evidence.gates_dir(mv.path).glob(f"*/{gate_evidence.RESULT_FILE}")):
            try:
                data = p.read_bytes()  # verify and parse the same bytes
                verify_bytes(data, sig_path(p), trust, f"gate result {p.parent.name} of {mv.ref}",
                             f"Run the gate again where a trusted key is: `kit validate {mv.ref}`.")
                d = json.loads(data)
            except SignatureError as exc:
                log.warning("not counted as a gate: %s", exc)
                continue
            except (OSError, ValueError):
                continue
            if isinstance(d, dict):
                out.append(d)
        return out

    def sign_evidence(self, path: Path) -> str | None:
        """Sign a file this registry wrote (a gate's result.json) with its key; the key id, or None unkeyed."""
        if self.keyring is None or not self.keyring.can_sign():
            return None
        key = self.keyring.signer()
        sign_file(path, key)
        return key.key_id

    def gate_verdict(self, mv: ModelVersion, backend: str | None = None) -> tuple[str, JSONObject | None]:
        """("passed" | "failed" | "stale" | "-", the deciding gate result) for this version (among the
        results on ``backend``, when given).

        "stale": the newest result was recorded for another artifact sha256.
        """
        verdict, deciding = gate_evidence.verdict(self.gate_results(mv.name, mv.version), mv.artifact_sha256,
                                                  backend)
        if verdict == "passed" and self.keyring is not None and self.passing_gate(mv, backend) is None:
            return "unsigned", deciding  # a passing result.json no trusted key signed is no gate
        return verdict, deciding


def require_onnx(mv: ModelVersion) -> None:
    """Refuse (``ServingError``) a version without a registered ``model.onnx``, saying why capture made
    none; refuse (``UnsafeArtifactError``) a ``model.onnx.data`` that meta.json does not list."""
    if ONNX_FILE not in mv.files:
        why = mv.capture.get("onnx", {}).get("reason") or "it was registered before Kit exported ONNX"
        raise ServingError(
            f"{mv.ref} has no {ONNX_FILE}: it was captured without ONNX ({why.rstrip('.')}). Serve it with "
            "backend 'torch', or register the model again where `pip install kit[onnx]` is installed.")
    if (mv.path / ONNX_DATA_FILE).exists() and ONNX_DATA_FILE not in mv.files:
        raise UnsafeArtifactError(f"Refusing to load {mv.ref}: {ONNX_DATA_FILE} is in its folder but meta.json "
                                  "does not list it (added after registration). Remove it or register again.")


def file_problems(mv: ModelVersion) -> list[str]:
    """Every file's sha256 against meta.json (accidents; the signature of meta.json covers attackers).

    A check only: nothing is used from these reads (loads hash what they copy into the cache)."""
    problems = []
    for fname, expected in sorted(mv.files.items()):
        if not safe_file_name(fname):
            problems.append(f"{fname}: unsafe file name in meta.json")
            continue
        p = mv.path / fname
        if not p.is_file():
            problems.append(f"{fname}: missing")
        elif (got := sha256_file(p)) != expected:
            problems.append(f"{fname}: sha256 {got[:12]}… != recorded {expected[:12]}…")
    if artifact_digest(mv.files) != mv.artifact_sha256:
        problems.append("meta.json: artifact_sha256 does not match the file hashes")
    return problems

