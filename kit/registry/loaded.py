"""A verified version (meta.json read once, its signature checked over those bytes, parsed from them, bound
to its place) and a verified version loaded for inference: the module, its signature, and its stored
reference example.

With backend ``"torch"`` the module is the exported program (tensors in and out); with backend
``"onnxruntime"`` it is :class:`kit.backends.onnx.session.OrtModule` (numpy arrays in, a tuple of numpy arrays out, in
signature output order) and the example and reference are numpy arrays: that path never imports torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit.errors import IntegrityError
from kit.registry.records import ModelVersion

if TYPE_CHECKING:
    from kit._types import Array
    from kit.env import DriftReport
    from kit.signature import Signature


@dataclass(frozen=True)
class VerifiedVersion:
    """What :meth:`kit.registry.integrity.CheckedStore.verified` returns: the ModelVersion parsed from
    ``meta`` (the bytes whose signature verified, by ``signed_by``; None when the registry checks no
    signatures), whose ``name`` and ``version`` are those of the folder it was read from."""

    version: ModelVersion
    signed_by: str | None
    meta: bytes

    @property
    def meta_sha256(self) -> str:
        return hashlib.sha256(self.meta).hexdigest()


@dataclass
class LoadedModel:
    """A verified version ready for inference."""

    version: ModelVersion
    module: Any  # torch: the exported program (an nn.Module); onnxruntime: an OrtModule (numpy in and out)
    signature: Signature
    example_inputs: tuple[Array, ...]
    reference_outputs: tuple[Array, ...]
    drift: DriftReport | None = None
    signed_by: str | None = None  # the trusted key whose signature of meta.json verified at load
    backend: str = "torch"  # "torch" | "onnxruntime"
    files_dir: Path | None = None  # where the loaded bytes were read: the verified cache entry

    def _mismatch_cause(self) -> str:
        if self.signed_by:
            return (f"Its files are the ones key {self.signed_by} signed (signature and sha256 verified at load), so "
                    "they were not tampered with: this environment computes differently (another "
                    f"{'onnxruntime' if self.backend == 'onnxruntime' else 'torch'} build, library or device). "
                    "Re-validate the version here")
        return ("Its files match meta.json's sha256 but no signature was checked (no trusted keys here), so "
                "either someone who can write the registry replaced the weights and re-hashed meta.json, or "
                "this environment computes differently. Verify it against a trusted key (`kit verify`, with "
                "`kit keys`) before trusting it; if it verifies, re-validate the version here")

    def __call__(self, *inputs: Array) -> Any:
        if self.backend == "onnxruntime":
            return self.module(*inputs)
        import torch

        with torch.inference_mode():
            return self.module(*inputs)

    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol) this version's reference is checked with: capture's parity record for the backend."""
        parity = self.version.capture.get("parity", {})
        if self.backend == "onnxruntime":
            parity = self.version.capture.get("onnx", {}).get("parity", parity)
        return float(parity.get("atol", 1e-5)), float(parity.get("rtol", 1e-4))

    def check_reference(self, atol: float | None = None, rtol: float | None = None) -> float:
        """Run the stored example; raise IntegrityError when it no longer gives the reference output
        (:func:`kit.backends.parity.compare`, the one rule)."""
        from kit.backends.parity import compare
        from kit.signature import flatten_outputs

        default_atol, default_rtol = self.tolerance()
        atol = default_atol if atol is None else atol
        rtol = default_rtol if rtol is None else rtol
        outs = flatten_outputs(self(*self.example_inputs), [s.name for s in self.signature.outputs])
        match = compare([as_numpy(o) for o in outs], [as_numpy(r) for r in self.reference_outputs], atol=atol,
                        rtol=rtol, dtypes=[s.dtype for s in self.signature.outputs])
        if not match.ok:
            raise IntegrityError(
                f"{self.version.ref} no longer reproduces its reference output on backend {self.backend} "
                f"(max |diff| {match.max_abs_diff:.3g}, atol {atol:g}). {self._mismatch_cause()}."
            )
        return match.max_abs_diff


def as_numpy(x: Any) -> Any:
    """A numpy view of a torch tensor (detached, on the CPU) or a numpy array as is."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()  # numpy has no bfloat16
    return x
