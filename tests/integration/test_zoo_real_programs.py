"""The pt2 loader on what the real-model zoo's programs hold (tests/zoo/real.py): an ``arange`` of a
dynamic size with an explicit dtype (T5's relative position buckets: ``torch.arange(seq, dtype=torch.long)``)
is bounded by its size alone (its dtype and layout are ints in the schema too: they raised TypeError at
every call), and the fast path computes what eager does at several sequence lengths.
"""

from __future__ import annotations

import torch
from torch import nn

from kit.backends.pt2.archive import inspect_pt2
from kit.backends.pt2.fx_build import build
from kit.capture import capture


class Positions(nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], dtype=torch.long, device=ids.device)
        return ids * 2 + pos


def test_an_arange_with_a_dtype_over_a_dynamic_dim_runs_on_the_fast_path(tmp_path):
    ids = torch.randint(0, 50, (2, 7))
    captured = capture(Positions(), ids, dynamic={"ids": {1: "seq"}}, dims={"seq": (2, 64)}, onnx=False)
    captured.save(tmp_path)
    fast = build(inspect_pt2(tmp_path / "model.pt2"))
    for seq in (2, 7, 64):
        x = torch.randint(0, 50, (3, seq))
        out = fast(x)
        assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, Positions()(x))
