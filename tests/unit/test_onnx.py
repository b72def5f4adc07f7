"""ONNX at capture, in the registry and at load: export (dynamic dims, dict outputs), a model ONNX cannot
take, what the registry stores and checks, the torch-free onnxruntime loader, its safety checks, the
environment check by backend, the gate's suite on onnxruntime and the service's backend setting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kit.capture import capture
from kit.errors import IntegrityError, ServiceError, ServingError, UnsafeArtifactError

pytestmark = pytest.mark.usefixtures("fresh_gate_recorder")  # tests/unit/conftest.py


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Tagger(nn.Module):
    """int64 ids and an int64 mask over a dynamic seq; a dict output (pooled logits and per-token states)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(ids) * mask.unsqueeze(-1).float()
        return {"logits": self.out(h.sum(1)), "hidden": h}


class Inverse(nn.Module):
    """torch.linalg.inv: torch.export takes it, torch.onnx has no ONNX function for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(x.reshape(-1, 2, 2) + 3 * torch.eye(2)).reshape(-1, 4)


def _tagger_example() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (4, 7), generator=gen)
    mask = torch.ones(4, 7, dtype=torch.int64)
    mask[:, 5:] = 0
    return ids, mask


DYN = {"ids": {1: "seq"}, "mask": {1: "seq"}}


@pytest.fixture(scope="module")
def tagger_capture():
    torch.manual_seed(0)
    return capture(Tagger().eval(), _tagger_example(), dynamic=DYN, dims={"seq": (2, 64)})


# ---------------------------------------------------------------- export at capture


def test_an_mlp_exports_with_onnxruntime_parity():
    torch.manual_seed(0)
    rec = capture(MLP().eval(), torch.randn(5, 6)).onnx.record
    assert rec["exported"] is True and rec["file"] == "model.onnx" and rec["opset"] >= 18
    assert rec["parity"]["batch_sizes"] == [5, 8] and rec["parity"]["max_abs_diff"] <= rec["parity"]["atol"]
    assert rec["onnxruntime"] == __import__("onnxruntime").__version__


def test_a_dynamic_seq_and_a_dict_output_export(tagger_capture):
    rec = tagger_capture.onnx.record
    assert rec["exported"] is True and rec["parity"]["dims"] == {"seq": [7, 10]}
    import onnx

    proto = onnx.load(str(tagger_capture.onnx.folder / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["ids", "mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "hidden"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) and d for d in dims)  # batch and seq stay dynamic


def test_a_model_onnx_cannot_export_keeps_torch_and_says_why(caplog):
    cm = capture(Inverse(), torch.rand(3, 4))
    rec = cm.onnx.record
    assert rec["exported"] is False and "aten.linalg_inv_ex" in rec["reason"] and "backend 'torch'" in rec["reason"]
    assert "no ONNX export" in caplog.text
    assert capture(MLP().eval(), torch.randn(2, 6), onnx=False).onnx.record["exported"] is False


# ---------------------------------------------------------------- the registry


def test_the_registry_stores_model_onnx_hashed_and_signed(registry, tagger_capture):
    mv = registry.register("tagger", tagger_capture)
    assert sorted(mv.files) == ["example.npz", "model.onnx", "model.pt2"]
    meta = json.loads((mv.path / "meta.json").read_text())
    assert meta["capture"]["onnx"]["exported"] is True and meta["files"]["model.onnx"] == mv.files["model.onnx"]
    assert (mv.path / "meta.json.sig").is_file()  # the signature of meta.json binds model.onnx's sha256
    with open(mv.path / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="model.onnx: sha256"):
        registry.load("tagger", 1, backend="onnxruntime")


def test_the_loader_takes_and_gives_numpy_equal_to_eager(registry, tagger_capture):
    registry.register("tagger", tagger_capture)
    m = registry.load("tagger", 1, backend="onnxruntime", threads=1)
    assert m.backend == "onnxruntime" and all(isinstance(x, np.ndarray) for x in m.example_inputs)
    assert m.check_reference() <= 1e-5
    ids, mask = (x[:, :10] for x in _tagger_example())
    ids = torch.cat([ids, ids[:, :3]], 1)
    mask = torch.cat([mask, mask[:, :3]], 1)
    logits, hidden = m.module(ids.numpy(), mask.numpy())
    eager = tagger_capture.program.module()(ids, mask)
    np.testing.assert_allclose(logits, eager["logits"].detach().numpy(), atol=1e-5)
    assert hidden.shape == (4, 10, 8)
    with pytest.raises(ValueError, match=r"Inputs disagree on seq"):
        m.module(ids.numpy(), mask.numpy()[:, :4])
    with pytest.raises(ValueError, match=r"input 'ids' must be int64\[batch, seq\]"):
        m.module(ids.numpy().astype(np.int32), mask.numpy())
    assert registry.load("tagger", 1).backend == "torch"


def test_a_version_without_onnx_is_refused_with_the_reason(registry):
    registry.register("inv", capture(Inverse(), torch.rand(3, 4)))
    with pytest.raises(ServingError, match="captured without ONNX .*linalg_inv_ex.*backend 'torch'"):
        registry.load("inv", 1, backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.load("inv", 1, backend="tensorrt")


# ---------------------------------------------------------------- what a model.onnx may read


def _with_external_data(folder: Path, location: str) -> Path:
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])], [w])
    model = helper.make_model(graph)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    if location != "model.onnx.data":
        m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(m, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_external_data_outside_the_version_folder_is_refused(tmp_path):
    from kit.backends.checks import Limits
    from kit.backends.onnx.scan import check_onnx

    ok = _with_external_data(tmp_path, "model.onnx.data")
    assert [p.name for p in check_onnx(ok, Limits())] == ["model.onnx", "model.onnx.data"]
    with pytest.raises(UnsafeArtifactError, match="over|exceed"):
        check_onnx(ok, Limits(max_bytes=64))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UnsafeArtifactError, match=r"keeps its data in '\.\./\.\./etc/passwd'"):
        check_onnx(_with_external_data(bad, "../../etc/passwd"), Limits())
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(UnsafeArtifactError, match="not a well-formed ONNX model"):
        check_onnx(tmp_path / "junk.onnx", Limits())


# ---------------------------------------------------------------- the environment by backend


def test_env_diff_judges_the_runtime_of_the_backend():
    from kit.env import diff, fingerprint

    here = fingerprint()
    assert here.onnxruntime == __import__("onnxruntime").__version__
    no_torch = dataclasses.replace(here, torch=None)
    assert diff(here, no_torch, backend="onnxruntime").ok  # a server with onnxruntime needs no torch
    assert not diff(here, no_torch, backend="torch").ok
    other_ort = dataclasses.replace(here, onnxruntime="1.19.0")
    assert not diff(here, other_ort, backend="onnxruntime").ok
    assert diff(here, other_ort, backend="torch").ok


# ---------------------------------------------------------------- the gate's suite on onnxruntime


def test_the_default_suite_runs_on_onnxruntime(registry, tagger_capture):
    from kit.gate import record, suite

    registry.register("tagger", tagger_capture)
    m = registry.load("tagger", 1, backend="onnxruntime")
    suite.run_all(m, max_p95_ms_batch1=1000.0, max_p95_ms_batch_n=5000.0, batch_n=8, latency_repeats=5)
    checks = record.checks()
    assert all(c.passed for c in checks), [c.line() for c in checks if not c.passed]
    assert {"dynamic dim seq", "wrong shape is refused", "parity on the stored example"} <= {c.name for c in checks}
    assert isinstance(suite.make_inputs(m, 3)[0], np.ndarray)


# ---------------------------------------------------------------- the service's backend


def test_service_backend_setting_and_its_checks(registry, tagger_capture, tmp_path):
    from kit.service_settings import read_service_toml
    from kit.servicegen import backend_warnings, generate

    registry.register("tagger", tagger_capture)
    registry.register("inv", capture(Inverse(), torch.rand(3, 4)))
    assert "no production version" in backend_warnings(registry.root, "tagger", "onnxruntime")[0]
    registry.promote("tagger", 1, force=True, why="test")
    assert "kit validate tagger@1 --backend onnxruntime" in backend_warnings(registry.root, "tagger", "onnxruntime")[0]
    out = generate("svc", "tagger", registry=registry.root, out_dir=tmp_path, backend="onnxruntime")
    assert read_service_toml(out)["model"]["backend"] == "onnxruntime"
    assert 'backend = "onnxruntime"' in (out / "service.toml").read_text()
    with pytest.raises(ServiceError, match='must be "torch" or "onnxruntime"'):
        generate("svc2", "tagger", registry=registry.root, out_dir=tmp_path, backend="tensorrt")
    registry.promote("inv", 1, force=True, why="test")
    with pytest.raises(ServiceError, match="inv@1 \\(production\\) has no model.onnx.*linalg_inv_ex"):
        generate("svc3", "inv", registry=registry.root, out_dir=tmp_path, backend="onnxruntime")


@pytest.mark.parametrize("op,sizes", [("ConstantOfShape", [20000, 20000]), ("Expand", [20000, 20000]),
                                      ("Tile", [20000, 20000]), ("Range", [0, 1 << 40, 1])])
@pytest.mark.parametrize("constant_node", [False, True])
def test_generators_with_huge_constant_sizes_are_refused(tmp_path, op, sizes, constant_node):
    """Issue 17 class 2: a 100-byte model.onnx asking onnxruntime for 1.6 GB is refused before it opens."""
    import crafted_artifacts as ca

    from kit.backends.checks import Limits
    from kit.backends.onnx.scan import check_onnx

    bad = ca.onnx_generator(tmp_path / "model.onnx", op, sizes, constant_node=constant_node)
    assert bad.stat().st_size < 300
    with pytest.raises(UnsafeArtifactError, match=rf"its {op} node would make a tensor of about .* over the "
                                                  r"limit of 268435456.*max_tensor_bytes"):
        check_onnx(bad, Limits())
    small = [2, 3] if op != "Range" else [0, 6, 1]
    ok = ca.onnx_generator(tmp_path / "ok.onnx", op, small, constant_node=constant_node)
    assert check_onnx(ok, Limits()) == [ok]
    with pytest.raises(UnsafeArtifactError, match="over the limit of 8"):
        check_onnx(ok, Limits(max_tensor_bytes=8))
