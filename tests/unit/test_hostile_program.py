"""A signed model whose program is hostile: the loader runs no code from it and bounds what it allocates.

Issue 17, classes 1 and 2. Each crafted program is a real Kit capture with one edit (tests/crafted_artifacts.py):
Python in a graph name (torch.fx writes names into the source it exec's), call targets outside ATen
(``torch.ops.load_library``, ``torch.ops.import_module``, dunders, unknown namespaces), tensors made from
huge sizes (``aten.full``), Python operators making huge ints (``_operator.lshift`` on JSON ints), huge JSON
ints. Every one is refused with ``UnsafeArtifactError`` and its payload never runs. The memory side (RSS
does not grow) is measured in a subprocess: tests/integration/test_hostile_program_memory.py.
"""

from __future__ import annotations

import json

import crafted_artifacts as ca
import pytest
import torch
from torch import nn

from kit.backends.checks import Limits
from kit.backends.pt2 import fx_build as _fx_build
from kit.backends.pt2.archive import inspect_pt2
from kit.capture import capture, load_program
from kit.errors import UnsafeArtifactError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return ca.good_archive(tmp_path_factory.mktemp("good"))


def _crafted(good, tmp_path, edit):
    return ca.rewrite(good, tmp_path / "model.pt2", edit)


@pytest.mark.parametrize("which", ["input", "node", "output"])
def test_python_in_a_graph_name_is_refused_and_never_runs(good, tmp_path, which):
    marker = tmp_path / "PWNED"
    bad = _crafted(good, tmp_path, ca.python_name(marker, which))
    with pytest.raises(UnsafeArtifactError, match=r"Refusing to load .*not a plain identifier"):
        fwd = load_program(bad)
        fwd(torch.randn(2, 6))
    assert not marker.exists(), "a name from the artifact ran as Python"


@pytest.mark.parametrize("which", ["input", "node", "output"])
def test_the_builder_names_every_node_itself(good, tmp_path, which):
    """Second line: past the grammar, no name from the JSON reaches the generated source."""
    marker = tmp_path / "PWNED"
    with ca.zipfile.ZipFile(_crafted(good, tmp_path, ca.python_name(marker, which))) as zf:
        program = json.loads(zf.read("model/models/model.json"))
    graph = _fx_build._Builder(program).build()
    assert "__import__" not in graph.code and "PWNED" not in graph.code
    assert not marker.exists()
    fwd = _fx_build.build(inspect_pt2(good))
    assert [n.name for n in fwd.graph.graph.nodes if n.op == "placeholder"] == [f"input_{i}" for i in range(5)]


@pytest.mark.parametrize("target", [
    "torch.ops.load_library.__call__",   # torch.ops itself: loads a shared library
    "torch.ops.import_module.__call__",  # torch.ops itself: imports a module
    "torch.ops.load_library",
    "torch.ops.aten.relu.__call__",      # a dunder of a real operator
    "torch.ops.aten.__class__.Tensor",   # a dunder packet (only aten's ten bitwise operators are allowed)
    "torch.ops.aten.__init__.default",
    "torch.ops.mylib.evil.default",      # an unknown namespace
    "torch.ops.quantized.linear.default",  # a namespace torch has, not allowed
    "torch.ops.aten.from_file.default",  # aten, but reads a file
    "math.__loader__",
    "torch.os.system",
])
def test_call_targets_outside_aten_are_refused(good, tmp_path, target):
    bad = _crafted(good, tmp_path, ca.call_target(target))
    with pytest.raises(UnsafeArtifactError, match=r"Refusing to load .*calls '.*', not an operator of aten/prims"):
        load_program(bad)


def test_an_unknown_aten_operator_is_refused_by_the_builder(good, tmp_path):
    bad = _crafted(good, tmp_path, ca.call_target("torch.ops.aten.no_such_op.default"))
    with pytest.raises(UnsafeArtifactError, match="no operator overload this torch knows"):
        load_program(bad)
    with pytest.raises(_fx_build.Refused):
        _fx_build.resolve_target("torch.ops.aten.relu.no_such_overload")
    assert _fx_build.resolve_target("torch.ops.aten.relu.default") is torch.ops.aten.relu.default


def test_full_with_a_huge_shape_is_refused_at_load(good, tmp_path):
    bad = _crafted(good, tmp_path, ca.full_of([1 << 15, 1 << 15]))  # 4 GiB of float32 from 30 bytes of JSON
    with pytest.raises(UnsafeArtifactError, match=r"full.default would make a tensor of about 4.3e\+09 bytes.*"
                                                  r"max_tensor_bytes"):
        load_program(bad)


def test_the_tensor_limit_is_a_setting(good, tmp_path):
    small = _crafted(good, tmp_path, ca.full_of([2, 5]))
    load_program(small)(torch.randn(2, 6))  # under the default limit: builds and runs
    with pytest.raises(UnsafeArtifactError, match="over the limit of 16"):
        load_program(small, Limits(max_tensor_bytes=16))


def test_sizes_from_input_sizes_are_checked_per_call_before_allocating(good, tmp_path):
    """``full([batch * k, 5])``: the size is symbolic, so a check node runs before ``full`` on every call."""
    def program(k):
        return _crafted(good, tmp_path, ca.symbolic_full(k))

    fwd = load_program(program(10))  # 10 * batch rows: fine
    assert fwd(torch.randn(3, 6)).shape == (30, 2)
    assert "check_size" in fwd.graph.code
    fwd = load_program(program(1 << 40))  # loads: the size is unknown until a call
    with pytest.raises(UnsafeArtifactError, match=r"at these input sizes its full.default would make a tensor"):
        fwd(torch.randn(1, 6))


@pytest.mark.parametrize("target,a,b", [
    ("_operator.lshift", 1, 10**9),  # a 125 MB int from two JSON ints
    ("_operator.pow", 2, 10**6),
    ("_operator.mul", 2**62, 2**62),
])
def test_python_operators_on_huge_ints_are_refused(good, tmp_path, target, a, b):
    bad = _crafted(good, tmp_path, ca.python_operator_on(target, a, b))
    with pytest.raises(UnsafeArtifactError, match="outside int64"):
        load_program(bad)


def test_python_operators_check_ints_made_at_call_time():
    lshift, mul = _fx_build._PY_OPS["lshift"], _fx_build._PY_OPS["mul"]
    assert lshift(3, 4) == 48 and mul(2.5, 2) == 5.0
    with pytest.raises(UnsafeArtifactError, match="outside int64"):
        lshift(1, 64)
    with pytest.raises(UnsafeArtifactError, match="outside int64"):
        mul(1 << 40, 1 << 40)


def test_a_python_operator_on_tensors_is_refused(good, tmp_path):
    bad = _crafted(good, tmp_path, ca.call_target("_operator.mul", [
        {"name": "a", "arg": {"as_tensor": {"name": "linear"}}, "kind": 1},
        {"name": "b", "arg": {"as_tensor": {"name": "linear"}}, "kind": 1}]))
    with pytest.raises(UnsafeArtifactError, match="applies _operator.mul to a tensor"):
        load_program(bad)


def test_huge_json_ints_are_refused_while_parsing(good, tmp_path):
    bad = _crafted(good, tmp_path, ca.huge_json_int)
    with pytest.raises(UnsafeArtifactError, match=r"an integer outside int64 \(1000000000000000000000000000000\)"):
        load_program(bad)


def test_torch_deserializer_fallback_is_refused_unless_trusted(tmp_path):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda v: self.lin(v), lambda v: -self.lin(v), (x,))

    torch.manual_seed(0)
    model = Branchy().eval()
    capture(model, torch.randn(3, 4)).save(tmp_path)
    with pytest.raises(UnsafeArtifactError, match=r"needs torch's deserializer \(control flow .*cond\).*"
                                                  r"trust_deserializer=True"):
        load_program(tmp_path / "model.pt2")
    x = torch.randn(2, 4)
    trusted = load_program(tmp_path / "model.pt2", Limits(trust_deserializer=True))
    torch.testing.assert_close(trusted(x), model(x))


def test_service_toml_max_tensor_bytes_reaches_registry_load(tmp_path):
    from kit.registry import Registry
    from kit.servicegen import generate
    from kit.serving.config import load_service_config

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.zeros(2)  # aten.zeros([2]): a tensor made from a constant size

    reg = Registry(tmp_path / "registry", require_gate=False, user="t")
    reg.register("padded", Padded(), torch.randn(2, 3))
    d = generate("padded", "padded", registry=reg.root, out_dir=tmp_path / "services", max_tensor_bytes=4)
    assert "max_tensor_bytes = 4" in (d / "service.toml").read_text()
    cfg = load_service_config(d, environ={})
    assert cfg.max_tensor_bytes == 4
    with pytest.raises(UnsafeArtifactError, match=r"zeros.default would make a tensor .* over the limit of 4"):
        reg.load("padded", 1, max_tensor_bytes=cfg.max_tensor_bytes)
    reg.load("padded", 1)  # the default (derived: 256 MiB) admits it


def test_a_malformed_program_is_an_unsafe_artifact_not_a_crash(good, tmp_path):
    def drop_inputs(program):
        del program["graph_module"]["graph"]["nodes"][0]["inputs"]

    bad = _crafted(good, tmp_path, ca._program_edit(drop_inputs))
    with pytest.raises(UnsafeArtifactError, match=r"its program is malformed \(KeyError: 'inputs'\)"):
        load_program(bad)


class BitwiseAndArange(nn.Module):
    """What Hugging Face attention code records: `mask & mask` (aten.__and__) and arange(seq) positions."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = (mask > 0) & (ids > 3)
        pos = torch.arange(ids.shape[1])
        return (keep * (ids + pos)).float()


def test_aten_bitwise_dunders_and_arange_of_a_size_load_and_answer(tmp_path):
    ids, mask = torch.randint(0, 9, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    captured = capture(BitwiseAndArange(), (ids, mask), dynamic={0: {1: "seq"}, 1: {1: "seq"}}, onnx=False)
    assert any("__and__" in str(n.target) for n in captured.program.graph.nodes)
    path = tmp_path / "model.pt2"
    captured.save(tmp_path)
    fwd = load_program(path)
    ids2, mask2 = torch.randint(0, 9, (3, 9)), torch.randint(0, 2, (3, 9))
    assert torch.equal(fwd(ids2, mask2), BitwiseAndArange()(ids2, mask2))
