"""kit.backends.pt2.fx_build: what the fast graph builder refuses, so the caller falls back.

That every zoo model takes the fast path and equals torch's deserializer bit for bit, and that the fast path
imports neither torch._dynamo nor sympy, is tests/integration/test_zoo_programs.py (it captures models).
"""

from __future__ import annotations

import pytest

from kit.backends.pt2 import fx_build as _fx_build
from kit.backends.pt2.program import Unsupported


def test_unknown_argument_kinds_fall_back():
    builder = _fx_build._Builder({})
    with pytest.raises(Unsupported, match="as_graph"):
        builder.arg({"as_graph": {"name": "true_graph_0"}})
    with pytest.raises(Unsupported, match="control flow"):
        builder.target("torch.ops.higher_order.cond")
