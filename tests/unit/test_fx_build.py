"""kit.backends.pt2.fx_build: the program graph built from a checked .pt2's JSON, without torch's deserializer.

Every zoo model (MLP, CNN + BatchNorm, int64 ids + mask with a dynamic seq, GRU, Transformer, dict outputs)
must take the fast path and compute exactly what torch's own deserializer builds from the same file.
A fresh interpreter shows the fast path imports neither torch._dynamo nor sympy.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from zoo.models import ZOO

from kit.backends.pt2 import fx_build as _fx_build
from kit.backends.pt2.archive import inspect_pt2, load_exported_program
from kit.backends.pt2.program import ExportedForward, Unsupported, exported_forward
from kit.capture import capture, load_program


def _flat(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_fast_build_equals_torchs_deserializer(entry, tmp_path):
    model = entry.model()
    captured = capture(model, entry.example(), dynamic=entry.dynamic or None, dims=entry.dims or None)
    captured.save(tmp_path)
    archive = inspect_pt2(tmp_path / "model.pt2")
    fast = _fx_build.build(archive)  # raises Unsupported if the fast path cannot build it
    slow = exported_forward(load_exported_program(archive))
    assert isinstance(fast, ExportedForward)
    assert isinstance(load_program(tmp_path / "model.pt2"), ExportedForward)
    for batch, seq in ((1, entry.seqs[0]), (3, entry.seqs[-1])):
        inputs = entry.inputs(batch, seq, 7)
        with torch.inference_mode():
            got, want, eager = _flat(fast(*inputs)), _flat(slow(*inputs)), _flat(model(*inputs))
        for g, w, e in zip(got, want, eager):
            assert torch.equal(g, w), f"{entry.name}: the fast graph differs from torch's at batch {batch}"
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_fast_build_keeps_input_checks(tmp_path):
    entry = next(e for e in ZOO if e.name == "zoo-text")
    capture(entry.model(), entry.example(), dynamic=entry.dynamic, dims=entry.dims).save(tmp_path)
    fwd = load_program(tmp_path / "model.pt2")
    ids, mask = entry.inputs(2, 8, 0)
    with pytest.raises(ValueError, match="accepts 1 to 256"):
        fwd(*entry.inputs(2, 300, 0))
    with pytest.raises(ValueError, match="disagree"):
        fwd(ids, mask[:, :5])
    with pytest.raises(ValueError, match="int64"):
        fwd(ids.float(), mask)


def test_unknown_argument_kinds_fall_back(tmp_path):
    builder = _fx_build._Builder({})
    with pytest.raises(Unsupported, match="as_graph"):
        builder.arg({"as_graph": {"name": "true_graph_0"}})
    with pytest.raises(Unsupported, match="control flow"):
        builder.target("torch.ops.higher_order.cond")


def test_fast_path_imports_no_dynamo_or_sympy(tmp_path):
    entry = next(e for e in ZOO if e.name == "zoo-transformer")
    capture(entry.model(), entry.example(), dynamic=entry.dynamic, dims=entry.dims).save(tmp_path)
    code = textwrap.dedent(f"""
        import sys, torch
        from kit.capture import load_program
        fwd = load_program({str(tmp_path / "model.pt2")!r})
        fwd(torch.randint(1, 100, (2, 9)))
        heavy = sorted(m for m in ("torch._dynamo", "sympy", "torch._export.serde.serialize") if m in sys.modules)
        print(type(fwd).__name__, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "ExportedForward []", out.stdout + out.stderr
