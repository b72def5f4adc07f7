"""Capturing real models and loading their programs (moved from tests/unit: each captures several models
with torch.export, tens of seconds on a 2-core box).

Every zoo model (MLP, CNN + BatchNorm, int64 ids + mask with a dynamic seq, GRU, Transformer, dict outputs)
must take the fast path (kit.backends.pt2.fx_build) and compute exactly what torch's own deserializer builds
from the same file; every kind of model Kit captures stores its tensors uncompressed and without sample
inputs. A fresh interpreter shows the fast path imports neither torch._dynamo nor sympy.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from zoo.models import ZOO

from kit.backends.pt2 import fx_build as _fx_build
from kit.backends.pt2.archive import inspect_pt2, load_exported_program
from kit.backends.pt2.program import ExportedForward, exported_forward
from kit.capture import capture, load_examples, load_program


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


def test_every_model_kit_captures_passes(tmp_path):
    class Cnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 2)
            self.register_buffer("scale", torch.full((8,), 0.5))

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            h = (self.emb(ids) * mask.unsqueeze(-1)).sum(1) * self.scale + torch.tensor(0.25)
            return {"logits": self.head(h), "score": h.sum(1)}

    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(100, 32), nn.Linear(32, 2)
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.emb(ids), src_key_padding_mask=mask == 0).mean(1))

    from kit.demo import DigitsMLP

    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    cases = {
        "digits": (DigitsMLP(), torch.randn(1, 64), {}),
        "cnn": (Cnn().eval(), torch.randn(2, 1, 8, 8), {}),
        "text": (Text(), (ids, mask), {"dynamic": {"ids": {1: "seq"}, "mask": {1: "seq"}}}),
        "int64": (nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(6, 1)), torch.randint(0, 10, (3, 2)), {}),
        "gru": (Gru(), torch.randn(2, 5, 8), {}),
        "encoder": (Encoder(), (torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.int64)),
                    {"dynamic": {"ids": {1: "seq"}, "mask": {1: "seq"}}}),
    }
    for name, (model, example, kw) in cases.items():
        cap = capture(model, example, **kw)
        cap.save(tmp_path / name)
        archive = inspect_pt2(tmp_path / name / "model.pt2")
        assert archive.entries["data/sample_inputs/model.pt"].size == 0
        assert all(e.stored for e in archive.entries.values()), name
        loaded = load_program(tmp_path / name / "model.pt2")
        inputs = example if isinstance(example, tuple) else (example,)
        expected, got = model(*inputs), loaded(*inputs)
        if isinstance(expected, dict):
            expected, got = list(expected.values()), list(got.values())
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        load_examples(tmp_path / name / "example.npz")
