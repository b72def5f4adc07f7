"""Loading a ``.pt2`` exported program: the archive checked, then the graph built from the checked JSON.

Loading builds the program's graph straight from the archive's checked JSON
(:mod:`kit.backends.pt2.fx_build`): no ``torch.export.load``, no torch deserializer (whose import alone
pulls in ``torch._dynamo``, about a second on a small machine), no ``ExportedProgram``. A program that uses
what the builder does not know (control flow, buffer mutation) is refused unless the caller trusts the
signer (``Limits.trust_deserializer``): then torch's deserializer builds it from the same checked JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kit.backends.checks import DEFAULT_LIMITS, Limits
from kit.backends.pt2 import fx_build
from kit.backends.pt2.archive import inspect_pt2, load_exported_program
from kit.backends.pt2.program import Unsupported, exported_forward
from kit.errors import UnsafeArtifactError

log = logging.getLogger(__name__)


def load_program(path: Path, limits: Limits = DEFAULT_LIMITS) -> torch.nn.Module:
    """Load a ``.pt2`` exported program as a callable module. Never unpickles, never runs artifact code.

    :func:`kit.backends.pt2.archive.inspect_pt2` checks the archive first (``UnsafeArtifactError`` naming the entry);
    the weights are then mapped from the file, shared between processes, never copied per worker. The
    graph is built from the checked JSON by :func:`kit.backends.pt2.fx_build.build` (fast: no torch deserializer), the
    tensors it makes from sizes bounded by ``limits.max_tensor_bytes``. What the builder does not know
    (control flow, buffer mutation) is refused (``UnsafeArtifactError``) unless ``limits.trust_deserializer``.
    """
    archive = inspect_pt2(Path(path), limits)
    try:
        return fx_build.build(archive, limits)
    except fx_build.Refused as why:
        fix = "" if str(why).endswith(".") else ". Kit runs only ATen operators and size arithmetic from an " \
            "artifact: re-capture the model with kit.capture.capture()."
        raise UnsafeArtifactError(f"Refusing to load {path}: {why}{fix}") from None
    except UnsafeArtifactError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, RecursionError) as exc:
        raise UnsafeArtifactError(f"Refusing to load {path}: its program is malformed ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}). Re-capture the model with kit.capture.capture().") from exc
    except Unsupported as why:
        if not limits.trust_deserializer:
            raise UnsafeArtifactError(
                f"Refusing to load {path}: it needs torch's deserializer ({why}), which Kit does not run by "
                "default: that path trusts the signer (no bound on what the program allocates). Re-capture "
                "without control flow or buffer mutation, or load it with "
                "kit.backends.checks.Limits(trust_deserializer=True) if you trust whoever signed it.") from None
        log.warning("%s: building the program with torch's deserializer, trusting its signer (%s)", path, why)
    return exported_forward(load_exported_program(archive))
