"""Issue 17 class 2, measured: a tiny hostile program cannot make the loading process grow.

A fresh interpreter loads the crafted program (``aten.full([8200, 8200])``: 269 MB of float32 from 30 bytes
of JSON; an ONNX ``ConstantOfShape([8200, 8200])``) and reports its peak RSS growth (``VmHWM``,
reset just before, over ``VmRSS``). Kit
refuses both before allocating: the growth stays under 64 MB. The control raises ``max_tensor_bytes`` and
shows the same program does allocate the 269 MB, so the measurement can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import crafted_artifacts as ca
import pytest

MB = 1 << 20

_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from kit.backends.checks import Limits
    from kit.capture import load_program
    from kit.backends.onnx.scan import check_onnx
    pt2, onnx, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    load_program(pt2.replace("bad", "warm")) and check_onnx(onnx.replace("bad", "warm"), Limits())  # imports, warm
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak (VmHWM) restarts from the resident size now
    before = status("VmRSS:")
    refused = []
    try:
        load_program(pt2, Limits(max_tensor_bytes=limit))(torch.randn(2, 6))
    except Exception as exc:
        refused.append(type(exc).__name__)
    if not limit:
        try:
            check_onnx(onnx, Limits())
        except Exception as exc:
            refused.append(type(exc).__name__)
    after = status("VmHWM:")
    print(json.dumps({"growth": after - before, "refused": refused}))
""")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    good = ca.good_archive(d / "good")
    ca.rewrite(good, d / "warm.pt2", ca.full_of([2, 5]))
    ca.rewrite(good, d / "bad.pt2", ca.full_of([8200, 8200]))
    ca.onnx_generator(d / "warm.onnx", "ConstantOfShape", [2, 3])
    ca.onnx_generator(d / "bad.onnx", "ConstantOfShape", [8200, 8200])
    return d


def _run(programs, limit: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(programs / "bad.pt2"), str(programs / "bad.onnx"),
                          str(limit)], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hostile_sizes_are_refused_before_memory_grows(programs):
    got = _run(programs, 0)
    assert got["refused"] == ["UnsafeArtifactError", "UnsafeArtifactError"], got
    assert got["growth"] < 64 * MB, f"RSS grew {got['growth'] / MB:.0f} MB loading a refused program"


def test_control_the_same_program_allocates_when_the_limit_allows(programs):
    got = _run(programs, 1 << 31)
    assert got["growth"] > 200 * MB, got  # torch filled the 269 MB before the next node failed on its shape
