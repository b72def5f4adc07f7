"""What opening any of a version's files may cost, and the zip reading every artifact check starts from.

:class:`Limits` bounds an artifact (entries, sizes, compression ratio, the tensors a program may make);
:func:`zip_entries` lists a zip's members with their data offsets, refusing duplicates, overlaps, bombs
and oversize members before anything reads them; :func:`check_npz` holds ``example.npz`` (every backend's
example) to plain ``.npy`` arrays. Each backend's own checks (``kit.backends.pt2.archive``,
``kit.backends.onnx.scan``) import this module, never the reverse. Standard library only.
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kit.errors import UnsafeArtifactError

GiB = 1 << 30
DEFAULT_MAX_ARTIFACT_BYTES = 8 * GiB


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


RECAPTURE = "Re-capture the model with kit.capture.capture() and register it again."
RAISE_LIMIT = "Raise [model] max_artifact_bytes if the model is that large."


def refuse(path: Path, what: str, fix: str = RECAPTURE) -> UnsafeArtifactError:
    return UnsafeArtifactError(
        f"Refusing to load {path}: {what}. Kit never unpickles or runs code from an artifact. {fix}")


# --------------------------------------------------------------------------- zip structure

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature .. extra field length (30 bytes)


def zip_entries(path: Path, limits: Limits) -> list[Entry]:
    """Every member with its data offset; refuses duplicates, overlaps, bombs and oversize members."""
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise refuse(path, f"it is not a torch.export archive (not a zip: {exc}; a pickle, perhaps)") from exc
    with zf, open(path, "rb") as f:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise refuse(path, f"{len(infos)} entries exceed the limit of {limits.max_entries}")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise refuse(path, f"entry {dup!r} appears twice (zip readers disagree on which one counts)")
        entries, total = [], 0
        for info in infos:
            entry = _one_entry(path, f, info, size, limits)
            total += entry.size
            if total > limits.max_bytes:
                raise refuse(path, f"its entries hold more than {limits.max_bytes} bytes uncompressed "
                              "(the artifact size limit)", RAISE_LIMIT)
            entries.append(entry)
    spans = sorted((e.data_offset, e.data_offset + e.compressed_size, e.name) for e in entries)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise refuse(path, f"entries {a!r} and {b!r} share bytes (an overlapping zip: a zip bomb)")
    return entries


def _one_entry(path: Path, f: BinaryIO, info: zipfile.ZipInfo, file_size: int, limits: Limits) -> Entry:
    name = info.filename
    if info.flag_bits & 0x1:
        raise refuse(path, f"entry {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise refuse(path, f"entry {name!r} uses compression method {info.compress_type}")
    if info.file_size > limits.max_bytes:
        raise refuse(path, f"entry {name!r} is {info.file_size} bytes uncompressed, over the limit of "
                      f"{limits.max_bytes}", RAISE_LIMIT)
    stored = info.compress_type == zipfile.ZIP_STORED
    if stored and info.file_size != info.compress_size:
        raise refuse(path, f"entry {name!r} is stored but claims {info.file_size} bytes in {info.compress_size}")
    if not stored and info.file_size > max(info.compress_size, 1) * limits.max_ratio:
        raise refuse(path, f"entry {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                      f"(limit {limits.max_ratio:.0f}x): a zip bomb")
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise refuse(path, f"entry {name!r} has no local header where the directory says")
    fields = _LOCAL_HEADER.unpack(head)
    name_len, extra_len = fields[9], fields[10]
    local_name = f.read(name_len).decode("utf-8", "replace")
    if local_name != name or fields[3] != info.compress_type:
        raise refuse(path, f"entry {name!r} disagrees with its local header ({local_name!r})")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if offset + info.compress_size > file_size:
        raise refuse(path, f"entry {name!r} runs past the end of the file (truncated?)")
    return Entry(name, offset, info.file_size, info.compress_size, stored)


def read_entry(path: Path, entry: Entry) -> bytes:
    """An entry's bytes (decompressed, already bounded by :func:`inspect_pt2`)."""
    with zipfile.ZipFile(path) as zf, zf.open(entry.name) as member:
        return member.read()  # zipfile stops at the size checked against the limits



_RESAVE = "Save examples with kit.capture.save_examples()."


def check_npz(path: Path, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse an ``.npz`` that holds anything but plain ``.npy`` arrays (object arrays are pickles)."""
    path = Path(path)
    for e in zip_entries(path, limits):
        if not e.name.endswith(".npy") or "/" in e.name:
            raise refuse(path, f"entry {e.name!r} is not a .npy array", _RESAVE)
        with zipfile.ZipFile(path) as zf, zf.open(e.name) as member:
            head = member.read(10 + 65536)
        descr = re.search(rb"'descr':\s*'([^']*)'", head)
        if head[:6] != b"\x93NUMPY" or descr is None or b"O" in descr.group(1):
            raise refuse(path, f"entry {e.name!r} is not a plain numeric array (object arrays are pickles)", _RESAVE)



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
