"""Loading one version for serving, on either backend, behind one calling convention.

Whatever serves it, a slot's ``forward`` takes a tuple of batched numpy arrays (the signature's dtypes,
C-contiguous; binary v2 data may be a read-only view of the request body) and returns a tuple of numpy
arrays in the signature's output order, so :mod:`kit.serving.protocol` and the inference thread
(:mod:`kit.serving.engine`) are the same code for both:

* ``"torch"``: the exported program (``model.pt2``) through ``Registry.load``; arrays become tensors with
  ``torch.from_numpy`` (no copy unless read-only: torch needs writeable memory) inside
  ``torch.inference_mode``, outputs come back with ``.numpy()`` (``.cpu()`` first on CUDA).
* ``"onnxruntime"``: ``model.onnx`` through ``Registry.load(..., backend="onnxruntime", threads=, device=)``,
  whose module already takes and returns numpy arrays. This path never imports torch.

Both run the stored reference check (``LoadedModel.check_reference``) and a warm-up at ``max_batch`` rows
before a version is served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kit.errors import ServingError
from kit.serving.protocol import np_dtype

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
Forward = Callable[[tuple[Any, ...]], tuple[Any, ...]]


def load_for_serving(registry: Any, model: str, version: int, *, backend: str, device: str, threads: int,
                     check_env: bool, max_artifact_bytes: int | None,
                     max_tensor_bytes: int = 0) -> tuple[Any, Forward]:
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


def _load(registry: Any, model: str, version: int, *, backend: str, device: str, threads: int,
          check_env: bool, max_artifact_bytes: int | None, max_tensor_bytes: int) -> tuple[Any, Forward]:
    if backend == "onnxruntime":
        loaded = registry.load(model, version, backend="onnxruntime", threads=threads, device=device,
                               check_env=check_env, max_artifact_bytes=max_artifact_bytes,
                               max_tensor_bytes=max_tensor_bytes)  # sha256 + env
        loaded.check_reference()  # warm-up and the stored reference output, on numpy
        return loaded, _ort_forward(loaded.module, loaded.signature)
    if backend != "torch":
        raise ServingError(f"Unknown serving backend {backend!r}; service.toml [model] backend takes one of "
                           f"{list(BACKENDS)}.")
    device = resolve_torch_device(device)
    loaded = registry.load(model, version, check_env=check_env, max_artifact_bytes=max_artifact_bytes,
                           max_tensor_bytes=max_tensor_bytes,
                           device=device)  # the registry moves the module and the example to the device
    loaded.check_reference()  # warm-up and the stored reference output
    return loaded, _torch_forward(loaded.module, device, loaded.signature)


def prune_cache(registry: Any, model: str) -> None:
    """After a load, bound the service's verified cache (``kit.registry.cache``): entries of versions the
    aliases no longer name, unused for a day, go. Best effort: a failure is logged, never raised."""
    try:
        removed = registry.prune_cache([model])
    except Exception:  # the cache is an optimisation of disk use here; serving never depends on pruning
        log.warning("could not prune the version cache of %s", model, exc_info=True)
        return
    if removed:
        log.info("pruned %d cached version(s) of %s: %s", len(removed), model, ", ".join(p.name[:12] for p in removed))


def warm_up(forward: Forward, loaded: Any, rows: int) -> None:
    """One forward pass at ``rows`` rows (the stored example repeated), so that the first big dynamic batch
    pays no first-call cost."""
    examples = [as_numpy(x) for x in loaded.example_inputs]
    forward(tuple(np.ascontiguousarray(a[[i % a.shape[0] for i in range(rows)]]) for a in examples))


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (CPU or CUDA; bfloat16 becomes float32)."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    try:
        return np.asarray(x.numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16): float32, as the protocol sends it
        return np.asarray(x.float().numpy())


def resolve_torch_device(device: str) -> str:
    """The torch device for models. Only ever called in a worker (after fork), never in the master."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ServingError(
                f"service.toml asks for device {device!r} but torch {torch.__version__} sees no CUDA GPU "
                f"(torch.cuda.is_available() is False; built for CUDA {torch.version.cuda}). Run on a GPU "
                "machine with a CUDA build of torch, or set [service] device = \"cpu\"."
            )
    return device


def _ort_forward(module: Any, sig: Any) -> Forward:
    """``session.run`` with the signature's names, fed the arrays as they are: onnxruntime only reads them
    (a read-only view of a v2 binary body is fine). The OrtModule's own per-call checks are skipped, as
    the torch path skips nn.Module hooks: kit.serving.protocol has checked every input against the signature."""
    run = module.session.run
    ins = [s.name for s in sig.inputs]
    outs = [s.name for s in sig.outputs]

    def forward(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(run(outs, dict(zip(ins, inputs))))
    return forward


def _torch_forward(module: Any, device: str, sig: Any) -> Forward:
    """numpy in, numpy out around the exported program; a dict output becomes its values in signature order."""
    import torch

    from kit.signature import flatten_outputs

    names = [s.name for s in sig.outputs]
    # a dtype numpy lacks (bfloat16) arrives as float32 (kit.serving.protocol.np_dtype): cast it here
    casts = tuple(getattr(torch, s.dtype, None) if np_dtype(s.dtype).name != s.dtype else None for s in sig.inputs)
    cast_any = any(c is not None for c in casts)
    # Call forward directly, skipping nn.Module.__call__'s hook machinery. For kit.capture.ExportedForward
    # (what Registry.load returns for inference programs) forward still checks rank, static dims and dtype
    # in a few microseconds; kit.serving.protocol has checked them against the signature already.
    call = getattr(module, "forward", module)
    dev = torch.device(device)
    on_cpu = device == "cpu"

    def tensors(inputs: tuple[Any, ...]) -> list[Any]:
        # torch.from_numpy shares the array's memory and needs it writeable (a binary v2 body is not)
        ts = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in inputs]
        if cast_any:
            ts = [t if c is None else t.to(c) for t, c in zip(ts, casts)]
        return ts if on_cpu else [t.to(dev, non_blocking=True) for t in ts]

    def forward(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        with torch.inference_mode():
            out = call(*tensors(inputs))
            return tuple(_numpy_out(o, on_cpu) for o in flatten_outputs(out, names))
    return forward


def _numpy_out(t: Any, on_cpu: bool) -> np.ndarray:
    if not on_cpu:
        t = t.cpu()
    try:
        return t.numpy()
    except TypeError:  # bfloat16 and friends: numpy has no such dtype
        return t.float().numpy()
