"""What a model takes and returns, made plain for ``torch.export`` and for every later reader.

A captured program's inputs are positional tensors and its output is a tensor, a tuple of tensors or a
plain ``dict`` of names to tensors: the only pytree types every reader (the service, the gate's kernel,
another host without transformers installed) can rebuild. Real models are richer:

- **keyword inputs**: Hugging Face models bind ``(ids, mask)`` positionally to ``forward(input_ids,
  past_key_values, ...)`` in GPT-2's case, so a dict of tensors ``{"input_ids": ..., "attention_mask": ...}``
  is passed by keyword and the dict's keys become the input names;
- **structured outputs**: a ``ModelOutput`` (or any registered pytree: dataclasses, nested tuples) is
  flattened into a dict named by each tensor's path (``logits``, ``hidden_states.0``); ``None`` fields are
  dropped. Without this the program's output spec names ``transformers.modeling_outputs.*`` and a reader
  without that class registered fails to load it.

:func:`plain_model` wraps a module only when one of these applies, so the plain cases keep their state
dict keys unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from kit.errors import CaptureError

_CACHE_HINT = ("Hugging Face models return a key/value cache by default: pass use_cache=False (or set "
               "model.config.use_cache = False) before capturing.")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")


def split_inputs(example_inputs: object) -> tuple[tuple[torch.Tensor, ...], list[str] | None]:
    """The example as a tuple of tensors, and the keyword names when it was given as a dict."""
    if isinstance(example_inputs, Mapping):
        if not example_inputs:
            raise CaptureError("example_inputs is an empty dict; give the model's tensors by name, e.g. "
                               "{'input_ids': ids, 'attention_mask': mask}.")
        bad = [k for k, v in example_inputs.items()
               if not (isinstance(k, str) and k.isidentifier()) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CaptureError(f"example_inputs as a dict must map parameter names to tensors; {bad!r} do not "
                               "(drop non-tensor arguments, or bind them with functools.partial / a wrapper).")
        return tuple(v.detach() for v in example_inputs.values()), list(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs.detach(),), None
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(t.detach() for t in example_inputs), None
    raise CaptureError(f"example_inputs must be a tensor, a tuple of tensors or a dict of parameter names to "
                       f"tensors, got {type(example_inputs).__name__}.")


def _key_text(key: object) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_plain(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    if type(out) is dict:
        return bool(out) and all(isinstance(k, str) and k and isinstance(v, torch.Tensor) for k, v in out.items())
    return type(out) in (tuple, list) and bool(out) and all(isinstance(t, torch.Tensor) for t in out)


def plain_outputs(out: Any) -> Any:
    """``out`` unchanged when it is a tensor, a tuple/list of tensors or a plain dict of them; any other
    pytree as a dict of path names to tensors (``None`` leaves dropped)."""
    if _is_plain(out):
        return tuple(out) if isinstance(out, list) else out
    leaves, _ = pytree.tree_flatten_with_path(out)
    named: dict[str, torch.Tensor] = {}
    for path, leaf in leaves:
        if leaf is None:
            continue
        name = ".".join(_key_text(k) for k in path) or "output"
        if not isinstance(leaf, torch.Tensor):
            hint = _CACHE_HINT if "Cache" in type(leaf).__name__ else (
                "Return tensors only (a tensor, a tuple or a dict of them), or wrap the model in a module "
                "that does.")
            raise CaptureError(f"The model's output {name or 'value'} is a {type(leaf).__name__}, not a tensor. "
                               + hint)
        if not _NAME.fullmatch(name):
            raise CaptureError(f"The model's output path {name!r} does not make a usable output name; return a "
                               "dict of simple names to tensors.")
        named[name] = leaf
    if not named:
        raise CaptureError(f"The model returned no tensor (got {type(out).__name__}).")
    return named


class _Plain(torch.nn.Module):
    """Calls the model with keyword inputs and/or makes its output plain (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, keywords: list[str] | None):
        super().__init__()
        self.model = model
        self.keywords = tuple(keywords) if keywords else ()

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.model(**dict(zip(self.keywords, xs))) if self.keywords else self.model(*xs)
        return plain_outputs(out)


def plain_model(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                keywords: list[str] | None) -> torch.nn.Module:
    """``model`` itself when it takes positional tensors and returns a plain output; else a wrapper."""
    if keywords:
        return _Plain(model, keywords).eval()
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:  # the user's forward: any error type; translate at the boundary
        raise CaptureError(f"{type(model).__name__} failed on the example inputs in eager mode: "
                           f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}. Check the example's shapes and dtypes, and "
                           "that tensors bind to the right parameters (pass a dict to bind them by name).") from exc
    if _is_plain(out):
        return model
    plain_outputs(out)  # a non-tensor leaf (a cache object, a string) is refused here, with its fix
    return _Plain(model, None).eval()


def shapes_for(fn: torch.nn.Module, shapes: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """torch.export binds ``dynamic_shapes`` to ``forward``'s parameters: the wrapper's ``*xs`` is one."""
    return (shapes,) if shapes is not None and isinstance(fn, _Plain) else shapes


def export_hint(exc: BaseException) -> str:
    """Known fixes for what torch.export says about real models, before the generic advice."""
    text = str(exc)
    if "Cache" in text or "past_key_values" in text:
        return _CACHE_HINT + " "
    return ""
