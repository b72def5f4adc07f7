"""Kit reads its own artifacts before torch or numpy touches them: nothing in one can run code.

A ``torch.export`` archive (``.pt2``) is a zip that may carry pickles — ``opaque_obj_*`` constants
(``pickle.loads``), ``custom_obj_*`` torchbind objects, weights and constants marked ``use_pickle``, the
sample inputs (torch retries them with ``weights_only=False``), legacy ``data/weights/<model>.pt`` files —
native code (AOTInductor), and program text that torch evaluates: sympy expressions (``sympify`` is
``eval``), guard code (compiled into a function by ``ExportedProgram.module()``), and operator targets
resolved by ``getattr`` from the ``torch`` module (``torch.os.system`` resolves). :func:`inspect_pt2`
opens the zip itself and refuses, with :class:`~kit.errors.UnsafeArtifactError` naming the entry, anything
but the raw tensors, JSON and markers that Kit's own captures hold, and program text outside a small
grammar (:mod:`kit.backends.pt2.grammar`). What opening costs is bounded by :class:`kit.backends.checks.Limits`.
:class:`MappedTensors` maps the checked raw tensor bytes read-only from the file, so the page cache is
shared by every worker; :func:`kit.backends.pt2.load.load_program` builds the program from what was
checked and never hands torch a byte it could unpickle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._types import JSONObject
from kit.backends.checks import DEFAULT_LIMITS, Entry, Limits, check_npz, read_entry, refuse, zip_entries
from kit.backends.pt2.grammar import ProgramTextError, is_dotted, parse_program, program_text_problem
from kit.errors import UnsafeArtifactError

if TYPE_CHECKING:
    import torch

MODEL_NAME = "model"  # torch.export.save names its single program "model"


@dataclass(frozen=True)
class Pt2Archive:
    """A ``.pt2`` that passed :func:`inspect_pt2`: entries by name (root folder stripped), parsed JSON."""

    path: Path
    root: str
    entries: dict[str, Entry]
    program_json: bytes
    weights: dict[str, JSONObject]
    constants: dict[str, JSONObject]
    program: JSONObject  # program_json parsed once, checked; what the loaders build from


# --------------------------------------------------------------------------- which entries may exist

# Entries Kit's own captures hold (torch.export.save of one program, torch 2.13), relative to the root.
_MARKERS = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": None,
            ".data/version": None, ".data/serialization_id": None}
_PROGRAM = f"models/{MODEL_NAME}.json"
_WEIGHTS_CONFIG = f"data/weights/{MODEL_NAME}_weights_config.json"
_CONSTANTS_CONFIG = f"data/constants/{MODEL_NAME}_constants_config.json"
_SAMPLE_INPUTS = f"data/sample_inputs/{MODEL_NAME}.pt"
_RAW = re.compile(r"data/weights/weight_\d{1,9}|data/constants/tensor_\d{1,9}")
_WHY = (
    ("data/constants/opaque_obj_", "an opaque object constant (torch reads it with pickle.loads)"),
    ("data/constants/custom_obj_", "a torchbind object constant (a pickle torch reads natively)"),
    ("data/aotinductor/", "AOTInductor native code"),
    ("data/executorch/", "an ExecuTorch program"),
    ("data/mtia", "an MTIA program"),
    ("xl_model_weights/", "XL weights (read with torch.load)"),
    ("data/sample_inputs/", "sample inputs (a pickle torch retries with weights_only=False)"),
    ("data/weights/", "legacy pickled weights"),
    ("data/constants/", "legacy pickled constants"),
    ("extra/", "an extra file Kit does not write"),
    ("models/", "a second program"),
)


def _why_refused(name: str) -> str:
    for prefix, why in _WHY:
        if name.startswith(prefix):
            return why
    return "an entry Kit's captures never hold"


def _split_root(path: Path, entries: list[Entry]) -> tuple[str, dict[str, Entry]]:
    roots = {e.name.split("/", 1)[0] for e in entries}
    if len(roots) != 1 or any("/" not in e.name for e in entries):
        raise refuse(path, f"entries are not under one root folder ({sorted(roots)[:3]})")
    root = roots.pop()
    by_name: dict[str, Entry] = {}
    for e in entries:
        rel = e.name.split("/", 1)[1]
        if rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
            raise refuse(path, f"entry {e.name!r} has an unsafe path")
        by_name[rel] = e
    return root, by_name


def _check_names(path: Path, root: str, entries: dict[str, Entry]) -> None:
    for rel, e in entries.items():
        if rel in _MARKERS or rel in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG) or _RAW.fullmatch(rel):
            continue
        if rel == _SAMPLE_INPUTS and e.size == 0:
            continue  # Kit saves without sample inputs: the entry is there, empty
        raise refuse(path, f"entry '{root}/{rel}' is {_why_refused(rel)}")
    for need in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, "archive_version"):
        if need not in entries:
            raise refuse(path, f"entry {root}/{need} is missing: not a torch.export archive of one program")


# --------------------------------------------------------------------------- configs and program text

def _payload_config(path: Path, root: str, rel: str, prefix: str,
                    entries: dict[str, Entry]) -> dict[str, JSONObject]:
    raw = read_entry(path, entries[rel])
    where = f"{root}/{rel}"
    try:
        config = json.loads(raw)["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse(path, f"{where} is not a payload config ({exc})") from exc
    if not isinstance(config, dict):
        raise refuse(path, f"{where} is not a payload config")
    for fqn, meta in config.items():
        if not is_dotted(fqn):
            raise refuse(path, f"{where} names a tensor {fqn[:120]!r}, not dotted identifiers")
        if not isinstance(meta, dict):
            raise refuse(path, f"{where}: {fqn!r} is not a payload entry")
        if meta.get("use_pickle") is not False:
            raise refuse(path, f"{where} asks to unpickle {fqn!r} (use_pickle)")
        name = meta.get("path_name")
        ok = isinstance(name, str) and re.fullmatch(rf"{prefix}\d{{1,9}}", name) is not None
        if not ok or f"{_dir(rel)}{name}" not in entries:
            raise refuse(path, f"{where}: {fqn!r} points at {name!r}, not a raw tensor entry of the archive")
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict) or tm.get("layout") != 7:  # schema.Layout.Strided
            raise refuse(path, f"{where}: {fqn!r} is not a strided tensor")
    return config


def _dir(rel: str) -> str:
    return rel.rsplit("/", 1)[0] + "/"


def _check_program(path: Path, where: str, raw: bytes) -> JSONObject:
    try:
        program = parse_program(raw)
    except ProgramTextError as exc:
        raise refuse(path, f"{where} holds {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise refuse(path, f"{where} is not JSON ({exc})") from exc
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise refuse(path, f"{where} is not a serialized exported program")
    problem = program_text_problem(program)
    if problem:
        raise refuse(path, f"{where} {problem}")
    return program


# --------------------------------------------------------------------------- entry points

def inspect_pt2(path: Path, limits: Limits = DEFAULT_LIMITS) -> Pt2Archive:
    """Check a ``.pt2`` without torch: structure, entry kinds, configs, program text, sizes.

    Raises :class:`~kit.errors.UnsafeArtifactError` naming the first entry refused.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise refuse(path, "Kit loads torch.export programs (.pt2) only")
    root, entries = _split_root(path, zip_entries(path, limits))
    _check_names(path, root, entries)
    for rel, expected in _MARKERS.items():
        if rel in entries and expected is not None and read_entry(path, entries[rel]).strip() != expected:
            raise refuse(path, f"entry {root}/{rel} is not {expected.decode()!r}")
    for rel in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
        if entries[rel].size > limits.max_json_bytes:
            raise refuse(path, f"entry {root}/{rel} is {entries[rel].size} bytes, over {limits.max_json_bytes}")
    weights = _payload_config(path, root, _WEIGHTS_CONFIG, "weight_", entries)
    constants = _payload_config(path, root, _CONSTANTS_CONFIG, "tensor_", entries)
    raw = read_entry(path, entries[_PROGRAM])
    program = _check_program(path, f"{root}/{_PROGRAM}", raw)
    return Pt2Archive(path, root, entries, raw, weights, constants, program)


# --------------------------------------------------------------------------- loading what was checked

def load_exported_program(archive: Pt2Archive) -> torch.export.ExportedProgram:
    """Build the ``torch.export.ExportedProgram`` of an inspected archive without ``torch.export.load``.

    Raw tensors are views of one read-only, copy-on-write mapping of the file (stored entries) or copies
    (compressed ones), so N workers serving one model share its weights through the page cache. Sample
    inputs are never read.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    file_map = MappedTensors(archive)
    state_dict = {fqn: file_map.tensor(f"data/weights/{m['path_name']}", m, param=bool(m.get("is_param")))
                  for fqn, m in archive.weights.items()}
    constants = {fqn: file_map.tensor(f"data/constants/{m['path_name']}", m, param=False)
                 for fqn, m in archive.constants.items()}
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, archive.program)
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as exc:  # torch raises many types for a malformed program; translate at the boundary
        raise UnsafeArtifactError(
            f"{archive.path} is not a loadable torch.export program: {type(exc).__name__}: {exc}"
        ) from exc


class MappedTensors:
    """Tensors over the archive's raw entries: one private mapping of the whole file, made on first use."""

    def __init__(self, archive: Pt2Archive):
        self.archive = archive
        self._storage: Any = None  # a torch.UntypedStorage (torch's stubs type from_file and set_ apart)

    def _flat(self, rel: str, dtype: torch.dtype) -> torch.Tensor:
        import torch

        entry = self.archive.entries[rel]
        item = torch.empty((), dtype=dtype).element_size()
        if entry.size % item:
            raise refuse(self.archive.path, f"entry {self.archive.root}/{rel} is {entry.size} bytes, not a whole "
                          f"number of {str(dtype).removeprefix('torch.')} elements")
        if entry.stored and entry.data_offset % item == 0:
            if self._storage is None:
                # MAP_PRIVATE: pages come from the page cache (shared between processes) until written.
                self._storage = torch.UntypedStorage.from_file(
                    str(self.archive.path), shared=False, nbytes=self.archive.path.stat().st_size)
            t = torch.empty(0, dtype=dtype)
            return t.set_(self._storage, entry.data_offset // item, (entry.size // item,), (1,))
        return torch.frombuffer(bytearray(read_entry(self.archive.path, entry)), dtype=dtype)

    def tensor(self, rel: str, meta: JSONObject, *, param: bool) -> torch.Tensor:
        import torch

        from kit.backends.pt2.dtypes import dtype_of

        where = f"{self.archive.root}/{rel}"
        try:
            tm = meta["tensor_meta"]
            dtype = dtype_of(tm["dtype"])
            size = [int(s["as_int"]) for s in tm["sizes"]]
            stride = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
            requires_grad = bool(tm.get("requires_grad"))
        except Exception as exc:
            raise refuse(self.archive.path, f"the tensor metadata for {where} is malformed ({exc!r})") from exc
        flat = self._flat(rel, dtype)
        extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(s > 0 for s in size) else 0
        if min(stride, default=0) < 0 or offset < 0 or extent > flat.numel():
            raise refuse(self.archive.path, f"the tensor {list(size)} over {where} reaches past its "
                          f"{flat.numel()} elements")
        if extent:  # as_strided's offset counts from the storage's start, not the flat view's
            t = torch.as_strided(flat, size, stride, flat.storage_offset() + offset)
        else:
            t = torch.zeros(size, dtype=dtype)
        if param:
            return torch.nn.Parameter(t, requires_grad=requires_grad)
        return t


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """``torch.export.save`` without the sample inputs (a pickle), so the archive passes :func:`inspect_pt2`."""
    import torch

    saved = program.example_inputs
    program.example_inputs = None
    try:
        torch.export.save(program, path)
    finally:
        program.example_inputs = saved


def check_version_files(directory: Path, limits: Limits = DEFAULT_LIMITS) -> None:
    """The checks a service makes before loading a registered version (``model.pt2``, ``example.npz``)."""
    inspect_pt2(Path(directory) / "model.pt2", limits)
    check_npz(Path(directory) / "example.npz", limits)
