"""What a gate compares the candidate with: the model's production version, resolved by the gate process.

The notebook gets a version number (``production_version``), never a path: it loads that version through
the same verified path as the candidate (:func:`kit.gate.open_registry`, then ``Registry.load``), and records
what it loaded (:func:`kit.gate.record.baseline`), which the runner holds to the artifact it resolved here.
A candidate with no production to compare (the first version, production itself, or a production version
that cannot be loaded on the gated backend) is judged on its own checks, and the result says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kit._types import JSONObject
from kit.errors import GateError, KitError
from kit.version_files import ONNX_FILE

if TYPE_CHECKING:
    from kit.registry import Registry
    from kit.registry.records import ModelVersion

PRODUCTION_PARAM = "production_version"


@dataclass(frozen=True)
class Baseline:
    """The production version a gate compares with (``version`` None: none, and ``note`` says why)."""

    version: int | None
    artifact_sha256: str | None
    note: str

    def to_dict(self) -> JSONObject:
        return {"version": self.version, "artifact_sha256": self.artifact_sha256, "note": self.note}

    def line(self, name: str) -> str:
        if self.version is None:
            return f"compared with: nothing ({self.note})"
        return f"compared with: production {name}@{self.version} sha256 {str(self.artifact_sha256)[:12]}"


def require_artifact(mv: ModelVersion, backend: str) -> None:
    """Refuse at once (before any kernel starts) a version that lacks the backend's artifact."""
    if backend == "onnxruntime" and ONNX_FILE not in mv.files:
        why = (mv.capture.get("onnx") or {}).get("error") if isinstance(mv.capture, Mapping) else None
        raise GateError(f"{mv.ref} has no {ONNX_FILE}, so it cannot be gated on onnxruntime"
                        + (f" (its ONNX export failed: {str(why)[:200]})" if why else "")
                        + ". Gate it on torch, or register it again with ONNX export on.")


def resolve(registry: Registry, mv: ModelVersion, backend: str) -> Baseline:
    """Production as the gate process sees it (verified), if it is another version loadable on ``backend``."""
    from kit.registry.integrity import file_problems

    try:
        prod = registry.aliases(mv.name).production
    except KitError as exc:
        return Baseline(None, None, f"production could not be read: {str(exc)[:200]}")
    if prod is None:
        return Baseline(None, None, "no production version to compare; judged on its own checks")
    if int(prod) == int(mv.version):
        return Baseline(None, None, f"{mv.ref} is production; judged on its own checks")
    try:
        pv = registry.verified(mv.name, int(prod)).version
        problems = file_problems(pv)
    except KitError as exc:
        problems = [str(exc)]
    if problems:
        return Baseline(None, None, f"production {mv.name}@{prod} fails verification ({'; '.join(problems)[:200]}); "
                                    "judged on its own checks")
    try:
        require_artifact(pv, backend)
    except GateError:
        return Baseline(None, None, f"production {pv.ref} has no {ONNX_FILE}; judged on its own checks")
    return Baseline(pv.version, pv.artifact_sha256, f"production {pv.ref}")


def problems(records: Sequence[Mapping[str, Any]], baseline: Baseline, signed: bool) -> list[str]:
    """What a notebook's ``baseline`` records break: it may compare only with the production the gate resolved,
    loaded with its signature checked (with a keyring)."""
    out = []
    for r in records:
        if r.get("kind") != "baseline":
            continue
        if baseline.version is None or r.get("sha256") != baseline.artifact_sha256:
            want = f"production {baseline.version}" if baseline.version is not None else "nothing (" + baseline.note + ")"
            out.append(f"it compared with {r.get('ref')} sha256 {str(r.get('sha256'))[:12]}, but the gate resolved "
                       f"{want}; compare with production_version only")
        elif signed and not r.get("signed_by"):
            out.append(f"it loaded production {r.get('ref')} without checking its signature; load it through "
                       "kit.gate.open_registry(registry)")
    return out
