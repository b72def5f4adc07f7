"""Crafted ``.pt2`` and ``.npz`` files an attacker who can write the registry could plant.

Each payload, if torch or numpy ever ran it, creates ``marker`` — tests assert it never appears. Built
from a real Kit capture so everything but the payload is what a service would accept.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class Evil:
    """Unpickling this opens (creates) ``marker``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def good_archive(directory: Path) -> Path:
    """A real Kit capture of a small MLP, saved the way Kit saves it (without ONNX: the .pt2 is what is opened)."""
    from kit.capture import capture

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    capture(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(3, 6), onnx=False).save(directory)
    return directory / "model.pt2"


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy ``src`` to ``dst`` with ``edit`` applied to {name relative to the root: bytes} (stored, like torch)."""
    with zipfile.ZipFile(src) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        files = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    edit(files)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(f"{root}/{name}", data)
    return dst


def _config_add(files: dict[str, bytes], rel: str, fqn: str, meta: dict) -> None:
    config = json.loads(files[rel])
    config["config"][fqn] = meta
    files[rel] = json.dumps(config).encode()


def opaque_object(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """An ``opaque_obj_*`` constant: torch reads it with ``pickle.loads``."""
    def edit(files: dict[str, bytes]) -> None:
        files["data/constants/opaque_obj_0"] = pickle.dumps(Evil(str(marker)))
        _config_add(files, "data/constants/model_constants_config.json", "evil",
                    {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None})
    return edit


def pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """A weight marked ``use_pickle``: torch reads it with ``torch.load(weights_only=False)``."""
    def edit(files: dict[str, bytes]) -> None:
        rel = "data/weights/model_weights_config.json"
        config = json.loads(files[rel])
        fqn, meta = next(iter(config["config"].items()))
        buf = io.BytesIO()
        torch.save(Evil(str(marker)), buf)
        files["data/weights/weight_9"] = buf.getvalue()
        config["config"][fqn] = {**meta, "path_name": "weight_9", "use_pickle": True}
        files[rel] = json.dumps(config).encode()
    return edit


def sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """Sample inputs that fail ``weights_only=True``: torch retries them with ``weights_only=False``."""
    def edit(files: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        torch.save(((Evil(str(marker)),), {}), buf)
        files["data/sample_inputs/model.pt"] = buf.getvalue()
    return edit


def sympy_expression(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """A shape expression: torch's deserializer hands it to ``sympy.sympify``, which is ``eval``."""
    def edit(files: dict[str, bytes]) -> None:
        text = files["models/model.json"].decode()
        sym = text.split('"expr_str": "', 1)[1].split('"', 1)[0]
        evil = f"Max(1, len(str(__import__('builtins').open('{marker}', 'w')))*0+1) * {sym}"
        files["models/model.json"] = text.replace(sym, evil, 1).encode()
    return edit


def guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """A guard: ``ExportedProgram.module()`` compiles it into the guard function it runs."""
    def edit(files: dict[str, bytes]) -> None:
        program = json.loads(files["models/model.json"])
        program["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
        files["models/model.json"] = json.dumps(program).encode()
    return edit


def operator_target(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """A node whose target resolves to ``os.system`` through ``getattr(torch, 'os')``."""
    def edit(files: dict[str, bytes]) -> None:
        text = files["models/model.json"].decode()
        files["models/model.json"] = text.replace("torch.ops.aten.relu.default", "torch.os.system", 1).encode()
    return edit


def aoti_library(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """An AOTInductor package: native code torch would dlopen."""
    def edit(files: dict[str, bytes]) -> None:
        files["data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 60
    return edit


def legacy_weights(marker: Path) -> Callable[[dict[str, bytes]], None]:
    """The legacy ``data/weights/model.pt`` pickle torch still reads."""
    def edit(files: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        torch.save({"w": Evil(str(marker))}, buf)
        files["data/weights/model.pt"] = buf.getvalue()
    return edit


PAYLOADS = {
    "opaque_obj": opaque_object,
    "use_pickle_weight": pickled_weight,
    "sample_inputs": sample_inputs,
    "sympy_expr": sympy_expression,
    "guards_code": guard_code,
    "operator_target": operator_target,
    "aotinductor": aoti_library,
    "legacy_weights": legacy_weights,
}


def zip_bomb(src: Path, dst: Path, gib: float = 0.25) -> Path:
    """A valid archive plus one deflated entry of ``gib`` GiB of zeros (~1000x smaller on disk)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for n in zin.namelist():
            zout.writestr(n, zin.read(n))
        info = zipfile.ZipInfo(f"{root}/data/weights/weight_7")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 20)
        with zout.open(info, "w", force_zip64=True) as f:
            for _ in range(int(gib * 1024)):
                f.write(chunk)
    return dst


def object_npz(marker: Path, dst: Path) -> Path:
    """An example.npz whose input is an object array (a pickle inside the .npy)."""
    import numpy as np

    arr = np.empty(1, dtype=object)
    arr[0] = Evil(str(marker))
    with open(dst, "wb") as f:
        np.savez(f, input_0=arr, output_0=np.zeros((1, 2), dtype=np.float32))
    return dst


# --------------------------------------------------------------------------- hostile programs
# A signed model's program JSON may be hostile: names that would be Python in the code torch.fx generates,
# call targets outside ATen, sizes that allocate without bound. Each edit keeps the archive otherwise valid.

def _program_edit(change: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    def edit(files: dict[str, bytes]) -> None:
        program = json.loads(files["models/model.json"])
        change(program)
        files["models/model.json"] = json.dumps(program).encode()
    return edit


def _rename(obj: object, old: str, new: str) -> object:
    """The graph name ``old`` -> ``new`` wherever it names a value: a tensor argument ``{"name": ...}``, a
    symbol's ``as_name``, a key of a values table (never a schema argument's name)."""
    if isinstance(obj, dict):
        if list(obj) == ["name"] and obj["name"] == old:
            return {"name": new}
        return {(new if k == old else k): (new if k == "as_name" and v == old else _rename(v, old, new))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(v, old, new) for v in obj]
    return obj


def python_name(marker: Path, which: str) -> Callable[[dict[str, bytes]], None]:
    """The user input (``which="input"``), the first node (``"node"``: its name and its output's) or the
    graph output (``"output"``) renamed to Python that creates ``marker`` if it reaches generated code: as
    the last parameter, ``x=<expr>`` is a default value, evaluated when torch.fx exec's ``forward``."""
    evil = f"x=__import__('pathlib').Path({str(marker)!r}).touch()"

    def change(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        if which == "input":
            old = graph["inputs"][-1]["as_tensor"]["name"]
        elif which == "node":
            old = graph["nodes"][0]["outputs"][0]["as_tensor"]["name"]
            graph["nodes"][0]["name"] = evil
        else:
            old = graph["outputs"][0]["as_tensor"]["name"]
        program.update(_rename(program, old, evil))  # type: ignore[arg-type]
    return _program_edit(change)


def call_target(target: str, inputs: list | None = None) -> Callable[[dict[str, bytes]], None]:
    """The ReLU node's target replaced (and its inputs, if given)."""
    def change(program: dict) -> None:
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].endswith("relu.default"))
        node["target"] = target
        if inputs is not None:
            node["inputs"] = inputs
    return _program_edit(change)


def full_of(size: list[int]) -> Callable[[dict[str, bytes]], None]:
    """The ReLU node replaced by ``aten.full(size, 1.0)``: a tensor from a shape in the JSON."""
    return call_target("torch.ops.aten.full.default", [
        {"name": "size", "arg": {"as_ints": size}, "kind": 1},
        {"name": "fill_value", "arg": {"as_float": 1.0}, "kind": 1}])


def python_operator_on(target: str, a: int, b: int) -> Callable[[dict[str, bytes]], None]:
    """A node computing ``target(a, b)`` on JSON ints (``_operator.lshift``, 1, 10**9: a gigabit int)."""
    def change(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        graph["nodes"].insert(0, {"target": target, "inputs": [
            {"name": "a", "arg": {"as_int": a}, "kind": 1}, {"name": "b", "arg": {"as_int": b}, "kind": 1}],
            "outputs": [{"as_sym_int": {"as_name": "big"}}], "metadata": {}, "name": "big"})
        graph["sym_int_values"]["big"] = {"as_int": 0}
    return _program_edit(change)


def huge_json_int(files: dict[str, bytes]) -> None:
    """The user input's recorded dim 1 as 10**30 (Python's json would parse it into a 100-bit int)."""
    def change(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        graph["tensor_values"][graph["inputs"][-1]["as_tensor"]["name"]]["sizes"][1] = {"as_int": 10**30}
    _program_edit(change)(files)


def symbolic_full(k: int) -> Callable[[dict[str, bytes]], None]:
    """The ReLU node replaced by ``aten.full([batch * k, 5], 1.0)``: a size computed from the input's."""
    def change(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        user = graph["inputs"][-1]["as_tensor"]["name"]
        graph["nodes"][:0] = [
            {"target": "torch.ops.aten.sym_size.int", "inputs": [
                {"name": "self", "arg": {"as_tensor": {"name": user}}, "kind": 1},
                {"name": "dim", "arg": {"as_int": 0}, "kind": 1}],
             "outputs": [{"as_sym_int": {"as_name": "rows"}}], "metadata": {}, "name": "rows"},
            {"target": "_operator.mul", "inputs": [
                {"name": "a", "arg": {"as_sym_int": {"as_name": "rows"}}, "kind": 1},
                {"name": "b", "arg": {"as_int": k}, "kind": 1}],
             "outputs": [{"as_sym_int": {"as_name": "many"}}], "metadata": {}, "name": "many"}]
        node = next(n for n in graph["nodes"] if n["target"].endswith("relu.default"))
        node["target"] = "torch.ops.aten.full.default"
        node["inputs"] = [{"name": "size", "arg": {"as_sym_ints": [{"as_name": "many"}, {"as_int": 5}]}, "kind": 1},
                          {"name": "fill_value", "arg": {"as_float": 1.0}, "kind": 1}]
    return _program_edit(change)


def onnx_generator(dst: Path, op: str, sizes: list, *, constant_node: bool = False) -> Path:
    """A ~120-byte ``model.onnx`` whose ``op`` (``ConstantOfShape``, ``Expand``, ``Tile``, ``Range``) makes
    a tensor from ``sizes`` held as an initializer (or a ``Constant`` node), then adds the input ``x``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = list(zip(("start", "limit", "delta"), sizes)) if op == "Range" else [
        ("repeats" if op == "Tile" else "shape", sizes)]
    nodes, inits = [], []
    for name, value in consts:
        array = np.array(value, np.int64)
        if constant_node:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array)))
        else:
            inits.append(numpy_helper.from_array(array, name))
    first = {"ConstantOfShape": [], "Expand": ["x"], "Tile": ["x"], "Range": []}[op]
    nodes += [helper.make_node(op, first + [n for n, _ in consts], ["big"]),
              helper.make_node("Add", ["big", "x"] if op != "Range" else ["big", "big"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT if op != "Range" else TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT if op != "Range" else TensorProto.INT64, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(dst))
    return dst


def plant(reg, name: str, version: int, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Replace ``name@version``'s model.pt2 with an edited copy and re-hash meta.json, as a registry writer
    without a key would (``kit verify`` then says ok when no key is trusted)."""
    import hashlib

    from kit.registry import artifact_digest

    mv = reg.get(name, version)
    pt2 = mv.path / "model.pt2"
    rewrite(pt2, pt2.with_suffix(".tmp"), edit).replace(pt2)
    meta_path = mv.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.pt2"] = hashlib.sha256(pt2.read_bytes()).hexdigest()
    meta["artifact_sha256"] = artifact_digest(meta["files"])
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
