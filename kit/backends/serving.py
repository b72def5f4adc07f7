"""Loading one version for serving, on either backend, behind one calling convention.

Whatever serves it, a slot's ``forward`` takes a tuple of batched numpy arrays (the signature's dtypes,
C-contiguous; binary v2 data may be a read-only view of the request body) and returns a tuple of numpy
arrays in the signature's output order, so :mod:`kit.serving.protocol` and the inference thread
(:mod:`kit.serving.engine`) are the same code for both:

``Registry.load(..., backend=)`` loads the version through the backend's row of :data:`kit.backends.BACKENDS`
and the row's module makes the forward (:mod:`kit.backends.pt2.serve`: tensors from and to numpy in
``torch.inference_mode``; :mod:`kit.backends.onnx.serve`: ``session.run``, never importing torch). Every
backend runs the stored reference check (``LoadedModel.check_reference``) and a warm-up at ``max_batch``
rows before a version is served. This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from kit import backends
from kit._types import Array
from kit.errors import ConfigError, ServingError

if TYPE_CHECKING:
    from kit.registry import Registry
    from kit.registry.loaded import LoadedModel

log = logging.getLogger(__name__)

Forward = Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]


def load_for_serving(registry: Registry, model: str, version: int, *, backend: str, device: str, threads: int,
                     check_env: bool, max_artifact_bytes: int | None,
                     max_tensor_bytes: int = 0) -> tuple[LoadedModel, Forward]:
    """(verified LoadedModel, its numpy ``forward``), the reference output checked. Off the request path.

    ``Registry.load`` verifies meta.json from one read and maps the version from the registry's local
    verified cache (``kit.registry.cache``), so the registry's files can change or vanish under a served
    version without effect; the cache is pruned after each load (:func:`prune_cache`)."""
    loaded, forward = _load(registry, model, version, backend=backend, device=device, threads=threads,
                            check_env=check_env, max_artifact_bytes=max_artifact_bytes,
                            max_tensor_bytes=max_tensor_bytes)
    if hasattr(registry, "prune_cache"):
        prune_cache(registry, model)
    return loaded, forward


def _load(registry: Registry, model: str, version: int, *, backend: str, device: str, threads: int,
          check_env: bool, max_artifact_bytes: int | None, max_tensor_bytes: int) -> tuple[LoadedModel, Forward]:
    try:
        impl = backends.get(backend).module()
    except ConfigError as exc:
        raise ServingError(f"Unknown serving backend {backend!r}; service.toml [model] backend takes one of "
                           f"{list(backends.names())}.") from exc
    device = impl.resolve_device(device)
    loaded = registry.load(model, version, backend=backend, threads=threads, device=device, check_env=check_env,
                           max_artifact_bytes=max_artifact_bytes,
                           max_tensor_bytes=max_tensor_bytes)  # signature, sha256, env; module and example on device
    loaded.check_reference()  # warm-up and the stored reference output
    return loaded, impl.forward(loaded, device)


def prune_cache(registry: Registry, model: str) -> None:
    """After a load, bound the service's verified cache (``kit.registry.cache``): entries of versions the
    aliases no longer name, unused for a day, go. Best effort: a failure is logged, never raised."""
    try:
        removed = registry.prune_cache([model])
    except Exception:  # the cache is an optimisation of disk use here; serving never depends on pruning
        log.warning("could not prune the version cache of %s", model, exc_info=True)
        return
    if removed:
        log.info("pruned %d cached version(s) of %s: %s", len(removed), model, ", ".join(p.name[:12] for p in removed))


def warm_up(forward: Forward, loaded: LoadedModel, rows: int) -> None:
    """One forward pass at ``rows`` rows (the stored example repeated), so that the first big dynamic batch
    pays no first-call cost."""
    examples = [as_numpy(x) for x in loaded.example_inputs]
    forward(tuple(np.ascontiguousarray(a[[i % a.shape[0] for i in range(rows)]]) for a in examples))


def as_numpy(x: Array) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (CPU or CUDA; bfloat16 becomes float32)."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    try:
        return np.asarray(x.numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16): float32, as the protocol sends it
        return np.asarray(x.float().numpy())
