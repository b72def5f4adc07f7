"""What a fresh interpreter imports (moved from tests/unit: each starts a Python subprocess).

One numpy path serves both backends, so an onnxruntime worker never imports torch; the gunicorn master never
imports torch; nothing in serving reaches Jupyter or the gate.
"""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from kit.capture import capture


def test_the_request_path_modules_never_import_torch():
    """One numpy path serves both backends: an onnxruntime worker imports these and never torch."""
    code = ("import sys, kit.serving.protocol, kit.serving.engine, kit.backends.serving,"
            " kit.backends.onnx.serve, kit.serving.handlers;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serving_never_imports_jupyter_and_hooks_never_import_torch():
    # kit.registry is what a worker loads versions with: it reads gate results through the core's
    # kit.evidence, never kit.gate (whose package would bring the runner, kernel and recorder along).
    code = ("import sys, kit.serving.asgi, kit.serving.worker, kit.serving.gunicorn_hooks, kit.servicegen, kit.registry;"
            "bad=[m for m in sys.modules if m in ('IPython','ipywidgets','papermill','nbconvert','nbformat',"
            "'jupyter_client') or m == 'kit.gate' or m.startswith('kit.gate.')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys, kit.serving.gunicorn_hooks, kit.servicegen, kit.serving;"
            "assert 'torch' not in sys.modules, 'the gunicorn master must not import torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


class _Tagger(nn.Module):
    """Two int64 inputs with a dynamic seq and a dict output: the shape of model an onnxruntime worker serves."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.out((self.emb(ids) * mask.unsqueeze(-1).float()).sum(1))}


def test_loading_with_onnxruntime_never_imports_torch(registry):
    ids, mask = torch.randint(1, 50, (4, 7)), torch.ones(4, 7, dtype=torch.int64)
    registry.register("tagger", capture(_Tagger().eval(), (ids, mask), dynamic={"ids": {1: "seq"}, "mask": {1: "seq"}},
                                        dims={"seq": (2, 64)}))
    code = ("import sys\nfrom kit.registry import Registry\nfrom kit.signing import Keyring\n"
            "import kit.signature, kit.env, kit.backends.pt2.archive, kit.signing, kit.version_files\n"
            "import kit.backends, kit.backends.checks, kit.backends.onnx.session, kit.backends.onnx.serve\n"
            "assert 'torch' not in sys.modules\n"
            f"r = Registry({str(registry.root)!r}, keyring=Keyring({str(registry.keyring.store.root)!r}))\n"
            "m = r.load('tagger', 1, backend='onnxruntime')\nm.check_reference()\n"
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))\n"
            "print('ok', type(m.module).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok OrtModule" in out.stdout, out.stderr[-2000:]
