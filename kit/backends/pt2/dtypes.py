"""The torch dtypes, layouts and memory formats a serialized program names, by their schema enums.

Both the archive's tensor reader (:mod:`kit.backends.pt2.archive`) and the graph builder
(:mod:`kit.backends.pt2.fx_build`) read them; a value outside these tables is
:class:`~kit.backends.pt2.program.Unsupported`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TypeVar

import torch
from torch._export.serde import schema

from kit.backends.pt2.program import Unsupported

DTYPES = {
    "BYTE": torch.uint8, "CHAR": torch.int8, "SHORT": torch.int16, "INT": torch.int32, "LONG": torch.int64,
    "HALF": torch.float16, "FLOAT": torch.float32, "DOUBLE": torch.float64, "COMPLEXHALF": torch.complex32,
    "COMPLEXFLOAT": torch.complex64, "COMPLEXDOUBLE": torch.complex128, "BOOL": torch.bool,
    "BFLOAT16": torch.bfloat16, "UINT16": torch.uint16, "UINT32": torch.uint32, "UINT64": torch.uint64,
    "FLOAT8E4M3FN": torch.float8_e4m3fn, "FLOAT8E5M2": torch.float8_e5m2, "FLOAT8E4M3FNUZ": torch.float8_e4m3fnuz,
    "FLOAT8E5M2FNUZ": torch.float8_e5m2fnuz, "FLOAT8E8M0FNU": torch.float8_e8m0fnu,
}
LAYOUTS = {"Strided": torch.strided}
FORMATS = {"ContiguousFormat": torch.contiguous_format, "ChannelsLast": torch.channels_last,
           "ChannelsLast3d": torch.channels_last_3d, "PreserveFormat": torch.preserve_format}


T = TypeVar("T")


def enum_of(table: Mapping[str, T], enum: type[Enum], value: object, what: str) -> T:
    """``table``'s entry for the serialized ``enum`` member ``value`` (``Unsupported`` if it has none)."""
    try:
        return table[enum(value).name]
    except (ValueError, KeyError):
        raise Unsupported(f"{what} {value!r}") from None


def dtype_of(value: object) -> torch.dtype:
    """The torch dtype of a serialized ``ScalarType``."""
    return enum_of(DTYPES, schema.ScalarType, value, "scalar type")
