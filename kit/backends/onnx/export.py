"""ONNX at capture: export the ``torch.export`` program capture made, check it with onnxruntime.

:func:`export_onnx` runs ``torch.onnx.export(program, dynamo=True)`` on the program (its dynamic dims
stay dynamic), saves ``model.onnx`` (weights embedded under 2 GB, else in ``model.onnx.data``) into a
private temporary folder, and runs it with onnxruntime at the batch sizes and dim values capture
checked the program at. The files checked are the files registered: :meth:`OnnxExport.save` copies them.

Export and parity failures never fail capture: the result says ``exported: False`` and why, and the
version is served with the torch backend.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._types import JSONObject
from kit.backends.parity import HALF_FLOOR, compare
from kit.version_files import ONNX_DATA_FILE, ONNX_FILE

if TYPE_CHECKING:
    import numpy as np
    import torch

    # (label, inputs, eager outputs): one point capture checked the program at
    Check = tuple[str, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]

log = logging.getLogger("kit.capture")

INSTALL_HINT = "pip install kit[onnx]"
# torch's ONNX registry logs one warning per torchvision op when torchvision is absent: noise here
_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration", "torch.onnx")


@dataclass(frozen=True)
class OnnxExport:
    """What capture's ONNX export gave: ``record`` is meta.json's ``capture.onnx``; ``folder`` holds the
    checked ``model.onnx`` (and ``model.onnx.data``) when exported."""

    record: JSONObject
    folder: Path | None = None
    files: tuple[str, ...] = field(default=())

    @property
    def exported(self) -> bool:
        return bool(self.record.get("exported"))

    def save(self, directory: Path) -> list[Path]:
        """Copy the checked files into ``directory``; returns the paths written (none when not exported)."""
        if self.folder is None:
            return []
        out = []
        for name in self.files:
            shutil.copyfile(self.folder / name, Path(directory) / name)
            out.append(Path(directory) / name)
        return out


def not_exported(reason: str) -> OnnxExport:
    log.warning("no ONNX export: %s", reason)
    return OnnxExport({"exported": False, "reason": reason})


def _missing_packages() -> str | None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; `{INSTALL_HINT}` and "
                "capture again to serve with onnxruntime (the torch backend serves this version).")
    return None


def failure_reason(exc: BaseException) -> str:
    """torch.onnx's error in one line: the op it has no ONNX function for, or its exception summary."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if op:
        return f"torch.onnx has no ONNX function for {op.group(1)}"
    summary = text.split("## Exception summary", 1)[-1]
    lines = [ln.strip() for ln in summary.splitlines() if ln.strip() and ln.strip() != "⬆️"]
    return f"{type(exc).__name__}: {(lines[0] if lines else type(exc).__name__)[:300]}"


_REGISTRY: dict[int, Any] = {}  # opset -> torchlib's ONNX registry (read-only during an export)


def _torch_onnx_export(program: torch.export.ExportedProgram, args: tuple[torch.Tensor, ...], in_names: list[str],
                       out_names: list[str]) -> torch.onnx.ONNXProgram | None:
    """``torch.onnx.export(program, args, dynamo=True)``, with torchlib's ONNX registry built once per process.

    torch builds that registry on every call by reading the source of ~500 ONNX functions: 0.85 s of a 1.2 s
    export of a small MLP. This calls the exporter torch.onnx.export itself calls, with the registry it would
    build; if this torch's private exporter is laid out differently, it is the public call instead.
    """
    import torch

    try:
        from torch.onnx import _constants as onnx_constants
        from torch.onnx._internal.exporter import _constants, _core, _registration

        opset = onnx_constants.ONNX_DEFAULT_OPSET
        registry_opset = max(opset, _constants.TORCHLIB_OPSET)  # as torch.onnx.export picks it
        if registry_opset not in _REGISTRY:
            _REGISTRY[registry_opset] = _registration.ONNXRegistry().from_torchlib(opset_version=registry_opset)
        export = _core.export
    except (ImportError, AttributeError):
        return torch.onnx.export(program, args, dynamo=True, input_names=in_names, output_names=out_names,
                                 verbose=False)
    return export(program, args, None, registry=_REGISTRY[registry_opset], input_names=in_names,
                  output_names=out_names, verbose=False, optimize=True, opset_version=opset)


def _export(program: torch.export.ExportedProgram, args: tuple[torch.Tensor, ...], in_names: list[str], out_names: list[str], folder: Path) -> int:
    """``torch.onnx.export`` into ``folder/model.onnx``; returns the opset."""

    quiet = [(logging.getLogger(n), logging.getLogger(n).level) for n in _QUIET_LOGGERS]
    try:
        for lg, _ in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.onnx's deprecations are not the user's to fix
            onnx_program = _torch_onnx_export(program, args, in_names, out_names)
            if onnx_program is None:  # only with dynamo=False, which Kit never asks for
                raise RuntimeError("torch.onnx.export returned no program")
            onnx_program.save(str(folder / ONNX_FILE))
    finally:
        for lg, level in quiet:
            lg.setLevel(level)
    return int(next((o.version for o in onnx_program.model_proto.opset_import if o.domain in ("", "ai.onnx")), 0))


def _diff(expected: Sequence[torch.Tensor], got: Sequence[np.ndarray], atol: float, rtol: float) -> tuple[float, bool]:
    """Eager tensors against onnxruntime's arrays by the one rule (:func:`kit.backends.parity.compare`)."""
    names = [str(e.dtype).removeprefix("torch.") for e in expected]
    want = [(e.detach().cpu().float() if n in HALF_FLOOR else e.detach().cpu()).numpy()  # numpy has no bfloat16
            for e, n in zip(expected, names)]
    m = compare(got, want, atol=atol, rtol=rtol, dtypes=names)
    return m.max_abs_diff, m.ok


def _parity(folder: Path, in_names: list[str], out_names: list[str],
            checks: Sequence[Check], atol: float, rtol: float) -> float:
    """Run model.onnx with onnxruntime on every check; the worst |diff|. ``ValueError`` when one fails."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    for label, inputs, expected in checks:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(in_names, inputs)}
        got = sess.run(out_names, feed)
        diff, ok = _diff(expected, got, atol, rtol)
        if not ok:
            raise ValueError(f"onnxruntime and eager outputs differ at {label}: max |diff| = {diff:.3g} exceeds "
                             f"atol={atol:g} + rtol={rtol:g}·|eager|; capture with looser atol/rtol if that "
                             "is expected")
        worst = max(worst, diff)
    return worst


def export_onnx(program: torch.export.ExportedProgram, checks: Sequence[Check], in_names: list[str],
                out_names: list[str], parity: JSONObject) -> OnnxExport:
    """Export ``program`` to ONNX and check it with onnxruntime on ``checks`` ((label, inputs, eager
    outputs), the first one the example). ``parity`` is capture's record (batch sizes, dims, atol, rtol).

    Never raises for a model ONNX cannot take: the record says ``exported: False`` and why.
    """
    missing = _missing_packages()
    if missing:
        return not_exported(missing)
    import onnxruntime

    folder = Path(tempfile.mkdtemp(prefix="kit-onnx-"))
    t0 = time.perf_counter()
    try:
        opset = _export(program, checks[0][1], in_names, out_names, folder)
    except Exception as exc:  # torch.onnx raises many unrelated types; the reason is what matters
        shutil.rmtree(folder, ignore_errors=True)
        return not_exported(f"{failure_reason(exc)}. Serve with backend 'torch', or rewrite that part of the "
                            "model with ops ONNX has and capture again.")
    # the tolerance this record holds is what serving checks the reference with (LoadedModel.tolerance)
    floor = max((HALF_FLOOR.get(str(e.dtype).removeprefix("torch."), 0.0) for e in checks[0][2]), default=0.0)
    parity = dict(parity, atol=max(parity["atol"], floor), rtol=max(parity["rtol"], floor))
    try:
        worst = _parity(folder, in_names, out_names, checks, parity["atol"], parity["rtol"])
    except Exception as exc:  # onnxruntime's own error types, or our parity ValueError
        shutil.rmtree(folder, ignore_errors=True)
        return not_exported(f"model.onnx does not reproduce the eager model: {str(exc)[:400]}. Serve with "
                            "backend 'torch'.")
    files = tuple(n for n in (ONNX_FILE, ONNX_DATA_FILE) if (folder / n).is_file())
    extra = sorted(p.name for p in folder.iterdir() if p.name not in files)
    if extra:
        shutil.rmtree(folder, ignore_errors=True)
        return not_exported(f"torch.onnx wrote files Kit does not register ({extra}). Serve with backend 'torch'.")
    record = {"exported": True, "file": ONNX_FILE, "opset": opset, "seconds": round(time.perf_counter() - t0, 3),
              "onnxruntime": onnxruntime.__version__, "parity": dict(parity, max_abs_diff=worst)}
    result = OnnxExport(record, folder, files)
    weakref.finalize(result, shutil.rmtree, folder, True)
    return result
