"""Kit reads its own artifacts before torch or numpy touches them: nothing in one can run code.

A ``torch.export`` archive (``.pt2``) is a zip that may carry pickles — ``opaque_obj_*`` constants
(``pickle.loads``), ``custom_obj_*`` torchbind objects, weights and constants marked ``use_pickle``, the
sample inputs (torch retries them with ``weights_only=False``), legacy ``data/weights/<model>.pt`` files —
native code (AOTInductor), and program text that torch evaluates: sympy expressions (``sympify`` is
``eval``), guard code (compiled into a function by ``ExportedProgram.module()``), and operator targets
resolved by ``getattr`` from the ``torch`` module (``torch.os.system`` resolves). :func:`inspect_pt2`
opens the zip itself and refuses, with :class:`~kit.errors.UnsafeArtifactError` naming the entry, anything
but the raw tensors, JSON and markers that Kit's own captures hold, and program text outside a small
grammar. It also bounds what opening costs (:class:`Limits`). :func:`load_program` then builds the program
from what was checked — raw tensor bytes mapped read-only from the file, so the page cache is shared by
every worker — and never hands torch a byte it could unpickle.

``check_npz`` does the same for ``example.npz``: ``.npy`` members only, no object arrays, bounded sizes.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit._pt2_grammar import ProgramTextError, is_dotted, parse_program, program_text_problem
from kit.errors import UnsafeArtifactError

GiB = 1 << 30
DEFAULT_MAX_ARTIFACT_BYTES = 8 * GiB
MODEL_NAME = "model"  # torch.export.save names its single program "model"


@dataclass(frozen=True)
class Limits:
    """What opening one artifact may cost.

    max_bytes : total uncompressed size of all entries (also the bound for any one entry).
    max_entries : number of zip entries.
    max_ratio : uncompressed / compressed size of a compressed entry (zip bombs); stored entries have 1.
    max_json_bytes : the program and config JSON (parsed into Python objects, so ~10x in memory).
    max_tensor_bytes : the most one tensor a program creates from sizes may hold (``[model]
        max_tensor_bytes``); 0: derived from the model, the larger of 256 MiB and 16x its weights' bytes.
    trust_deserializer : build what Kit's FX builder does not know (control flow, buffer mutation) with
        torch's deserializer. Off by default: that path trusts the signer (its names and node metadata reach
        code torch generates, and nothing bounds what it allocates).
    """

    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_entries: int = 10_000
    max_ratio: float = 50.0
    max_json_bytes: int = 256 << 20
    max_tensor_bytes: int = 0
    trust_deserializer: bool = False


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Entry:
    """One zip member: name inside the archive root, where its bytes start in the file, its sizes."""

    name: str
    data_offset: int
    size: int
    compressed_size: int
    stored: bool


@dataclass(frozen=True)
class Pt2Archive:
    """A ``.pt2`` that passed :func:`inspect_pt2`: entries by name (root folder stripped), parsed JSON."""

    path: Path
    root: str
    entries: dict[str, Entry]
    program_json: bytes
    weights: dict[str, dict[str, Any]]
    constants: dict[str, dict[str, Any]]
    program: dict[str, Any]  # program_json parsed once, checked; what the loaders build from


_RECAPTURE = "Re-capture the model with kit.capture.capture() and register it again."
_RAISE_LIMIT = "Raise [model] max_artifact_bytes if the model is that large."


def _refuse(path: Path, what: str, fix: str = _RECAPTURE) -> UnsafeArtifactError:
    return UnsafeArtifactError(
        f"Refusing to load {path}: {what}. Kit never unpickles or runs code from an artifact. {fix}")


# --------------------------------------------------------------------------- zip structure

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature .. extra field length (30 bytes)


def _zip_entries(path: Path, limits: Limits) -> list[Entry]:
    """Every member with its data offset; refuses duplicates, overlaps, bombs and oversize members."""
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse(path, f"it is not a torch.export archive (not a zip: {exc}; a pickle, perhaps)") from exc
    with zf, open(path, "rb") as f:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise _refuse(path, f"{len(infos)} entries exceed the limit of {limits.max_entries}")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _refuse(path, f"entry {dup!r} appears twice (zip readers disagree on which one counts)")
        entries, total = [], 0
        for info in infos:
            entry = _one_entry(path, f, info, size, limits)
            total += entry.size
            if total > limits.max_bytes:
                raise _refuse(path, f"its entries hold more than {limits.max_bytes} bytes uncompressed "
                              "(the artifact size limit)", _RAISE_LIMIT)
            entries.append(entry)
    spans = sorted((e.data_offset, e.data_offset + e.compressed_size, e.name) for e in entries)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _refuse(path, f"entries {a!r} and {b!r} share bytes (an overlapping zip: a zip bomb)")
    return entries


def _one_entry(path: Path, f: Any, info: zipfile.ZipInfo, file_size: int, limits: Limits) -> Entry:
    name = info.filename
    if info.flag_bits & 0x1:
        raise _refuse(path, f"entry {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _refuse(path, f"entry {name!r} uses compression method {info.compress_type}")
    if info.file_size > limits.max_bytes:
        raise _refuse(path, f"entry {name!r} is {info.file_size} bytes uncompressed, over the limit of "
                      f"{limits.max_bytes}", _RAISE_LIMIT)
    stored = info.compress_type == zipfile.ZIP_STORED
    if stored and info.file_size != info.compress_size:
        raise _refuse(path, f"entry {name!r} is stored but claims {info.file_size} bytes in {info.compress_size}")
    if not stored and info.file_size > max(info.compress_size, 1) * limits.max_ratio:
        raise _refuse(path, f"entry {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                      f"(limit {limits.max_ratio:.0f}x): a zip bomb")
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise _refuse(path, f"entry {name!r} has no local header where the directory says")
    fields = _LOCAL_HEADER.unpack(head)
    name_len, extra_len = fields[9], fields[10]
    local_name = f.read(name_len).decode("utf-8", "replace")
    if local_name != name or fields[3] != info.compress_type:
        raise _refuse(path, f"entry {name!r} disagrees with its local header ({local_name!r})")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if offset + info.compress_size > file_size:
        raise _refuse(path, f"entry {name!r} runs past the end of the file (truncated?)")
    return Entry(name, offset, info.file_size, info.compress_size, stored)


def read_entry(path: Path, entry: Entry) -> bytes:
    """An entry's bytes (decompressed, already bounded by :func:`inspect_pt2`)."""
    with zipfile.ZipFile(path) as zf, zf.open(entry.name) as member:
        return member.read()  # zipfile stops at the size checked against the limits


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
        raise _refuse(path, f"entries are not under one root folder ({sorted(roots)[:3]})")
    root = roots.pop()
    by_name: dict[str, Entry] = {}
    for e in entries:
        rel = e.name.split("/", 1)[1]
        if rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
            raise _refuse(path, f"entry {e.name!r} has an unsafe path")
        by_name[rel] = e
    return root, by_name


def _check_names(path: Path, root: str, entries: dict[str, Entry]) -> None:
    for rel, e in entries.items():
        if rel in _MARKERS or rel in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG) or _RAW.fullmatch(rel):
            continue
        if rel == _SAMPLE_INPUTS and e.size == 0:
            continue  # Kit saves without sample inputs: the entry is there, empty
        raise _refuse(path, f"entry '{root}/{rel}' is {_why_refused(rel)}")
    for need in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, "archive_version"):
        if need not in entries:
            raise _refuse(path, f"entry {root}/{need} is missing: not a torch.export archive of one program")


# --------------------------------------------------------------------------- configs and program text

def _payload_config(path: Path, root: str, rel: str, prefix: str,
                    entries: dict[str, Entry]) -> dict[str, dict[str, Any]]:
    raw = read_entry(path, entries[rel])
    where = f"{root}/{rel}"
    try:
        config = json.loads(raw)["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _refuse(path, f"{where} is not a payload config ({exc})") from exc
    if not isinstance(config, dict):
        raise _refuse(path, f"{where} is not a payload config")
    for fqn, meta in config.items():
        if not is_dotted(fqn):
            raise _refuse(path, f"{where} names a tensor {fqn[:120]!r}, not dotted identifiers")
        if not isinstance(meta, dict):
            raise _refuse(path, f"{where}: {fqn!r} is not a payload entry")
        if meta.get("use_pickle") is not False:
            raise _refuse(path, f"{where} asks to unpickle {fqn!r} (use_pickle)")
        name = meta.get("path_name")
        ok = isinstance(name, str) and re.fullmatch(rf"{prefix}\d{{1,9}}", name) is not None
        if not ok or f"{_dir(rel)}{name}" not in entries:
            raise _refuse(path, f"{where}: {fqn!r} points at {name!r}, not a raw tensor entry of the archive")
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict) or tm.get("layout") != 7:  # schema.Layout.Strided
            raise _refuse(path, f"{where}: {fqn!r} is not a strided tensor")
    return config


def _dir(rel: str) -> str:
    return rel.rsplit("/", 1)[0] + "/"


def _check_program(path: Path, where: str, raw: bytes) -> dict[str, Any]:
    try:
        program = parse_program(raw)
    except ProgramTextError as exc:
        raise _refuse(path, f"{where} holds {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _refuse(path, f"{where} is not JSON ({exc})") from exc
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _refuse(path, f"{where} is not a serialized exported program")
    problem = program_text_problem(program)
    if problem:
        raise _refuse(path, f"{where} {problem}")
    return program


# --------------------------------------------------------------------------- entry points

def inspect_pt2(path: Path, limits: Limits = DEFAULT_LIMITS) -> Pt2Archive:
    """Check a ``.pt2`` without torch: structure, entry kinds, configs, program text, sizes.

    Raises :class:`~kit.errors.UnsafeArtifactError` naming the first entry refused.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise _refuse(path, "Kit loads torch.export programs (.pt2) only")
    root, entries = _split_root(path, _zip_entries(path, limits))
    _check_names(path, root, entries)
    for rel, expected in _MARKERS.items():
        if rel in entries and expected is not None and read_entry(path, entries[rel]).strip() != expected:
            raise _refuse(path, f"entry {root}/{rel} is not {expected.decode()!r}")
    for rel in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
        if entries[rel].size > limits.max_json_bytes:
            raise _refuse(path, f"entry {root}/{rel} is {entries[rel].size} bytes, over {limits.max_json_bytes}")
    weights = _payload_config(path, root, _WEIGHTS_CONFIG, "weight_", entries)
    constants = _payload_config(path, root, _CONSTANTS_CONFIG, "tensor_", entries)
    raw = read_entry(path, entries[_PROGRAM])
    program = _check_program(path, f"{root}/{_PROGRAM}", raw)
    return Pt2Archive(path, root, entries, raw, weights, constants, program)


_RESAVE = "Save examples with kit.capture.save_examples()."


def check_npz(path: Path, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse an ``.npz`` that holds anything but plain ``.npy`` arrays (object arrays are pickles)."""
    path = Path(path)
    for e in _zip_entries(path, limits):
        if not e.name.endswith(".npy") or "/" in e.name:
            raise _refuse(path, f"entry {e.name!r} is not a .npy array", _RESAVE)
        with zipfile.ZipFile(path) as zf, zf.open(e.name) as member:
            head = member.read(10 + 65536)
        descr = re.search(rb"'descr':\s*'([^']*)'", head)
        if head[:6] != b"\x93NUMPY" or descr is None or b"O" in descr.group(1):
            raise _refuse(path, f"entry {e.name!r} is not a plain numeric array (object arrays are pickles)", _RESAVE)


# --------------------------------------------------------------------------- loading what was checked

def load_exported_program(archive: Pt2Archive) -> Any:
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
        self._storage: Any = None

    def _flat(self, rel: str, dtype: Any) -> Any:
        import torch

        entry = self.archive.entries[rel]
        item = torch.empty((), dtype=dtype).element_size()
        if entry.size % item:
            raise _refuse(self.archive.path, f"entry {self.archive.root}/{rel} is {entry.size} bytes, not a whole "
                          f"number of {str(dtype).removeprefix('torch.')} elements")
        if entry.stored and entry.data_offset % item == 0:
            if self._storage is None:
                # MAP_PRIVATE: pages come from the page cache (shared between processes) until written.
                self._storage = torch.UntypedStorage.from_file(
                    str(self.archive.path), shared=False, nbytes=self.archive.path.stat().st_size)
            t = torch.empty(0, dtype=dtype)
            return t.set_(self._storage, entry.data_offset // item, (entry.size // item,), (1,))
        return torch.frombuffer(bytearray(read_entry(self.archive.path, entry)), dtype=dtype)

    def tensor(self, rel: str, meta: dict[str, Any], *, param: bool) -> Any:
        import torch

        from kit._fx_build import dtype_of

        where = f"{self.archive.root}/{rel}"
        try:
            tm = meta["tensor_meta"]
            dtype = dtype_of(tm["dtype"])
            size = [int(s["as_int"]) for s in tm["sizes"]]
            stride = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
            requires_grad = bool(tm.get("requires_grad"))
        except Exception as exc:
            raise _refuse(self.archive.path, f"the tensor metadata for {where} is malformed ({exc!r})") from exc
        flat = self._flat(rel, dtype)
        extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(s > 0 for s in size) else 0
        if min(stride, default=0) < 0 or offset < 0 or extent > flat.numel():
            raise _refuse(self.archive.path, f"the tensor {list(size)} over {where} reaches past its "
                          f"{flat.numel()} elements")
        if extent:  # as_strided's offset counts from the storage's start, not the flat view's
            t = torch.as_strided(flat, size, stride, flat.storage_offset() + offset)
        else:
            t = torch.zeros(size, dtype=dtype)
        if param:
            return torch.nn.Parameter(t, requires_grad=requires_grad)
        return t


def save_program(program: Any, path: Path) -> None:
    """``torch.export.save`` without the sample inputs (a pickle), so the archive passes :func:`inspect_pt2`."""
    import torch

    saved = program.example_inputs
    program.example_inputs = None
    try:
        torch.export.save(program, path)
    finally:
        program.example_inputs = saved


def limits_for(max_bytes: int | None, max_tensor_bytes: int | None = None) -> Limits:
    """The default limits with ``max_bytes`` (``[model] max_artifact_bytes``) and ``max_tensor_bytes``
    (``[model] max_tensor_bytes``, 0: derived from the model) in place, if given."""
    if max_bytes is not None and max_bytes <= 0:
        raise UnsafeArtifactError(f"max_artifact_bytes must be positive, got {max_bytes}.")
    if max_tensor_bytes is not None and max_tensor_bytes < 0:
        raise UnsafeArtifactError(f"max_tensor_bytes must be 0 (derived from the model) or positive, got "
                                  f"{max_tensor_bytes}.")
    return Limits(max_bytes=DEFAULT_MAX_ARTIFACT_BYTES if max_bytes is None else max_bytes,
                  max_tensor_bytes=max_tensor_bytes or 0)


def tensor_limit(limits: Limits, model_bytes: int) -> int:
    """The most one tensor a program creates may hold: ``limits.max_tensor_bytes``, or when 0 the larger
    of 256 MiB and 16x the model's weights (a model's activations per call rarely exceed its weights much)."""
    return limits.max_tensor_bytes or max(GiB // 4, 16 * model_bytes)


def check_version_files(directory: Path, limits: Limits = DEFAULT_LIMITS) -> None:
    """The checks a service makes before loading a registered version (``model.pt2``, ``example.npz``)."""
    inspect_pt2(Path(directory) / "model.pt2", limits)
    check_npz(Path(directory) / "example.npz", limits)
