"""Type aliases for annotations, shared by every layer (core: imports nothing of kit's).

torch and numpy are named for the type checker only: importing this module imports neither, so the
onnxruntime server and the serving layer may use these aliases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

JSONObject: TypeAlias = dict[str, Any]
"""A parsed JSON object (meta.json, a record line, a request or response body): its values are JSON."""

Array: TypeAlias = Union["np.ndarray", "torch.Tensor"]
"""What a backend takes and returns: torch tensors for ``"torch"``, numpy arrays for ``"onnxruntime"``."""
