"""A verified version, loaded for inference: the module, its signature, and its stored reference example."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kit.errors import IntegrityError
from kit.registry.records import ModelVersion


@dataclass
class LoadedModel:
    """A verified version ready for inference."""

    version: ModelVersion
    module: Any
    signature: Any
    example_inputs: tuple[Any, ...]
    reference_outputs: tuple[Any, ...]
    drift: Any = None
    signed_by: str | None = None  # the trusted key whose signature of meta.json verified at load

    def _mismatch_cause(self) -> str:
        if self.signed_by:
            return (f"Its files are the ones key {self.signed_by} signed (signature and sha256 verified at load), so "
                    "they were not tampered with: this environment computes differently (another torch build, "
                    "library or device). Re-validate the version here")
        return ("Its files match meta.json's sha256 but no signature was checked (no trusted keys here), so "
                "either someone who can write the registry replaced the weights and re-hashed meta.json, or "
                "this environment computes differently. Verify it against a trusted key (`kit verify`, with "
                "`kit keys`) before trusting it; if it verifies, re-validate the version here")

    def __call__(self, *inputs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(*inputs)

    def check_reference(self, atol: float | None = None, rtol: float | None = None) -> float:
        """Run the stored example; raise IntegrityError when it no longer gives the reference output."""
        import torch

        parity = self.version.capture.get("parity", {})
        atol = parity.get("atol", 1e-5) if atol is None else atol
        rtol = parity.get("rtol", 1e-4) if rtol is None else rtol
        out = self(*self.example_inputs)
        from kit.signature import flatten_outputs

        outs = flatten_outputs(out, [s.name for s in self.signature.outputs])
        worst = 0.0
        for got, ref in zip(outs, self.reference_outputs):
            got = got.detach().cpu()
            if got.shape != ref.shape or not torch.allclose(got.double(), ref.double(), atol=atol, rtol=rtol):
                d = float((got.double() - ref.double()).abs().max()) if got.shape == ref.shape else float("inf")
                raise IntegrityError(
                    f"{self.version.ref} no longer reproduces its reference output (max |diff| {d:.3g}, "
                    f"atol {atol:g}). {self._mismatch_cause()}."
                )
            if got.numel():
                worst = max(worst, float((got.double() - ref.double()).abs().max()))
        return worst
