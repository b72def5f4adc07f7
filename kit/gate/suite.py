"""The default, model-agnostic validation checks (what ``default.ipynb`` calls, one function per cell).

Every function takes a :class:`kit.registry.LoadedModel`, records its verdict with
:func:`kit.gate.check` and returns the measured value, so a copied notebook can reuse, reorder or drop
any of them. Nothing here knows the model: inputs are made from the stored example (rows resampled,
values taken from the example, so integer ids stay in its range and masks stay masks), dynamic dims come
from the signature (``dims``; a signature written before named dims has only the batch).

Without data the suite proves what can be proven: parity on the stored example, determinism, finite
outputs, batch consistency, every dynamic dim at its bounds, and a wrong shape refused; latency against
absolute budgets only where the user sets them (the default gate compares latency with production's,
:mod:`kit.gate.compare`). :func:`quality` adds a metric on an ``.npz`` of the user's own data.

Each check runs as one :func:`kit.gate.record.step`: its start and end reach the gate's progress, and it
stops at its time budget (``check_budget_s``) with a failed check that names the budget and the setting.

Every check runs through the loaded model's backend (``model.backend``: ``"torch"`` takes and returns
tensors, ``"onnxruntime"`` numpy arrays), so its evidence is about what will serve. Inputs are made and
outputs compared as numpy arrays; :func:`make_inputs` and :func:`run` hand back the backend's own kind.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kit._types import Array
from kit.backends.parity import Match, compare
from kit.errors import GateError
from kit.gate.metrics import accuracy, resolve_metric, under
from kit.gate.record import Deadline, check, step
from kit.registry.loaded import LoadedModel, as_numpy

LABELS = "labels"
_EVAL_CHUNK = 256  # rows per forward when scoring data: bounded memory whatever the model's max batch
_MAX_DIM_TRY = 4096  # a dynamic dim is tried up to here (a range to 2**31 would only measure memory)


# --------------------------------------------------------------------------- model-agnostic helpers


def backend_of(model: LoadedModel) -> str:
    return str(getattr(model, "backend", "torch"))


def native(model: LoadedModel, arrays: Sequence[Array]) -> tuple[Array, ...]:
    """numpy arrays as the backend takes them: tensors for torch (a bfloat16 input, widened to float32 for
    numpy, cast back), contiguous arrays for onnxruntime."""
    if backend_of(model) == "onnxruntime":
        return tuple(np.ascontiguousarray(a) for a in arrays)
    import torch

    from kit.backends.pt2.serve import input_casts

    tensors = (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return tuple(t if c is None else t.to(c) for t, c in zip(tensors, input_casts(model.signature), strict=False))


def outputs_of(model: LoadedModel, out: Any) -> tuple[Array, ...]:
    """A model's output as a tuple of tensors in the signature's order (tensor, tuple or dict)."""
    if isinstance(out, Mapping):
        names = [s.name for s in model.signature.outputs]
        keys = names if set(names) == set(out) else list(out)
        return tuple(out[k] for k in keys)
    if isinstance(out, (tuple, list)):
        return tuple(out)
    return (out,)


def run(model: LoadedModel, inputs: Sequence[Array]) -> tuple[Array, ...]:
    """Call the model and flatten what it returns (tensors detached, on the CPU; or numpy arrays)."""
    outs = outputs_of(model, model(*native(model, inputs)))
    return tuple(t.detach().cpu() if hasattr(t, "detach") else t for t in outs)


def tolerances(model: LoadedModel) -> tuple[float, float]:
    """(atol, rtol) recorded at capture (the parity the backend's artifact was held to)."""
    if callable(getattr(model, "tolerance", None)):
        return model.tolerance()
    parity = (getattr(model.version, "capture", None) or {}).get("parity", {})
    return float(parity.get("atol", 1e-5)), float(parity.get("rtol", 1e-4))


def dim_ranges(model: LoadedModel) -> dict[str, tuple[int, int]]:
    """The signature's named dims and their inclusive ranges; ``batch`` alone for older signatures."""
    sig = model.signature
    dims = getattr(sig, "dims", None)
    if dims:
        return {str(k): (int(lo), int(hi)) for k, (lo, hi) in dict(dims).items()}
    batched = any(s.shape and s.shape[0] == "batch" for s in sig.inputs)
    return {"batch": (1, int(sig.max_batch))} if batched else {}


def _match(a: Sequence[Array], b: Sequence[Array], atol: float, rtol: float) -> Match:
    """Outputs ``a`` against the reference ``b`` by the one rule (:func:`kit.backends.parity.compare`)."""
    return compare([as_numpy(x) for x in a], [as_numpy(y) for y in b], atol=atol, rtol=rtol)


def _same_shapes(a: Sequence[Array], b: Sequence[Array]) -> bool:
    return len(a) == len(b) and all(as_numpy(x).shape == as_numpy(y).shape for x, y in zip(a, b))


def _nonfinite(x: Array) -> int:
    a = as_numpy(x)
    return int((~np.isfinite(a)).sum()) if a.dtype.kind in "fc" else 0


def make_inputs(model: LoadedModel, rows: int, *, sizes: Mapping[str, int] | None = None,
                seed: int = 0) -> tuple[Array, ...]:
    """Inputs of ``rows`` rows made from the stored example, every dynamic dim at ``sizes[name]``.

    Rows are drawn (the same rows for every input, so ids and their mask stay paired); a dim grown
    past the example repeats its values, so every value is one the example holds.
    """
    sig, example = model.signature, [as_numpy(x) for x in model.example_inputs]
    gen = np.random.default_rng(seed)
    have = int(example[0].shape[0]) if example and example[0].ndim else 1
    pick = gen.integers(0, have, size=rows) if rows != have else np.arange(have)
    out = []
    for spec, x in zip(sig.inputs, example):
        if spec.shape and spec.shape[0] == "batch":
            x = x.take(pick, axis=0)
        for axis, name in enumerate(spec.shape):
            if axis and isinstance(name, str) and sizes and name in sizes and x.shape[axis] > 0:
                x = x.take(np.arange(int(sizes[name])) % x.shape[axis], axis=axis)
        out.append(np.ascontiguousarray(x))
    return native(model, out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


# --------------------------------------------------------------------------- the checks


def parity(model: LoadedModel) -> float:
    """The stored example still gives the stored reference output (within the capture's tolerance)."""
    atol, rtol = tolerances(model)
    worst = float("inf")
    with step("parity on the stored example"):
        got = run(model, model.example_inputs)
        ref = tuple(model.reference_outputs)
        m = _match(got, ref, atol, rtol)
        worst, same = m.max_abs_diff, _same_shapes(got, ref)
        check("parity on the stored example", passed=m.ok, value=worst,
              threshold=atol, detail=f"max |output - reference|, rtol {rtol:g}" if same
              else "outputs differ in number or shape from the reference")
    return worst


def determinism(model: LoadedModel, repeats: int = 3, rows: int = 8) -> float:
    """The same input gives the same output on every call."""
    atol, _ = tolerances(model)
    rows = max(1, min(rows, int(model.signature.max_batch)))
    worst = float("inf")
    with step("deterministic on repeat") as d:
        x = make_inputs(model, rows, seed=1)
        first = run(model, x)
        worst = 0.0
        for _ in range(max(1, repeats - 1)):
            worst = max(worst, _match(run(model, x), first, 0.0, 0.0).max_abs_diff)
            d.tick()
        check("deterministic on repeat", passed=worst <= atol, value=worst, threshold=atol,
              detail=f"max |difference| over {repeats} calls at batch {rows}")
    return worst


def finite(model: LoadedModel, rows: int = 64) -> int:
    """No NaN or inf in the outputs, on the example and on ``rows`` rows made from it."""
    n = max(1, min(rows, int(model.signature.max_batch)))
    bad = -1
    with step("finite outputs"):
        outs = run(model, model.example_inputs) + run(model, make_inputs(model, n, seed=2))
        bad = sum(_nonfinite(o) for o in outs)
        check("finite outputs", passed=bad == 0, value=bad, threshold=0,
              detail=f"non-finite values on the example and {n} rows made from it")
    return bad


def batch_consistency(model: LoadedModel, rows: int = 16) -> float:
    """Each row's answer does not depend on the rows batched with it (the service batches requests)."""
    if "batch" not in dim_ranges(model):
        return 0.0
    atol, rtol = tolerances(model)
    n = max(1, min(rows, int(model.signature.max_batch)))
    worst, ok = 0.0, True
    with step("batch consistency") as d:
        x = make_inputs(model, n, seed=3)
        whole = run(model, x)
        for i in range(n):
            alone = run(model, tuple(as_numpy(t)[i:i + 1] for t in x))
            part = tuple(o[i:i + 1] for o in whole)
            m = _match(alone, part, atol * 10, rtol * 10)
            worst, ok = max(worst, m.max_abs_diff), ok and m.ok
            d.tick()
        check("batch consistency", passed=ok, value=worst, threshold=atol * 10,
              detail=f"each of {n} rows alone vs in one batch (rtol {rtol * 10:g})")
    return worst


def _p95_ms(model: LoadedModel, inputs: Sequence[Array], repeats: int, d: Deadline | None = None) -> tuple[float, int]:
    """(p95 ms, calls timed): after a warm-up, as many of ``repeats`` calls as fit in half of what is left
    of the step's budget (at least 5)."""
    t = time.perf_counter()
    for _ in range(3):  # warm-up, as the service does before it takes traffic
        model(*inputs)
    per_call = max((time.perf_counter() - t) / 3, 1e-6)
    n = max(1, int(repeats)) if d is None else max(min(5, int(repeats)), min(int(repeats), int(d.left() * 0.5 / per_call)))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model(*inputs)
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.percentile(times, 95)), n


def _within(model: LoadedModel, inputs: Sequence[Array], repeats: int, budget: float, d: Deadline | None = None
            ) -> tuple[float, int, int]:
    """(p95 ms, calls, rounds): a breach must reproduce. A second round is measured only when the first
    breaks the budget, and the better one counts: a scheduler hiccup on a shared machine is not the model."""
    p, n = _p95_ms(model, inputs, repeats, d)
    if p <= budget or (d is not None and d.left() <= 0):
        return p, n, 1
    return min(p, _p95_ms(model, inputs, repeats, d)[0]), n, 2


def latency(model: LoadedModel, *, batch_n: int = 64, max_p95_ms_batch1: float | None = None,
            max_p95_ms_batch_n: float | None = None, repeats: int = 50) -> tuple[float | None, float | None]:
    """p95 of single calls at batch 1 and at batch ``batch_n`` (capped by the max batch) against the
    absolute budgets the user set (ms). There is no default budget: a batch size without one is not
    measured here (the default gate compares latency with production's, :func:`kit.gate.compare.latency`)."""
    n = max(1, min(int(batch_n), int(model.signature.max_batch))) if "batch" in dim_ranges(model) else 1
    threads = _threads(model)
    results: list[float | None] = []
    for rows, budget, seed in ((1, max_p95_ms_batch1, 4), (n, max_p95_ms_batch_n, 5)):
        if budget is None:
            results.append(None)
            continue
        with step(f"latency p95, batch {rows}") as d:
            p, calls, rounds = _within(model, make_inputs(model, rows, seed=seed), repeats, float(budget), d)
            check(f"latency p95, batch {rows}", passed=p <= budget, value=round(p, 3), threshold=budget,
                  detail=f"ms over {calls} calls, backend {backend_of(model)}, {threads}"
                  + (", better of 2 rounds" if rounds > 1 else "") + "; an absolute budget the user set")
            results.append(p)
    return results[0], results[1]


def _threads(model: LoadedModel) -> str:
    """How many intra-op threads the backend runs with, in words."""
    if backend_of(model) == "onnxruntime":
        n = model.module.session.get_session_options().intra_op_num_threads
        return f"{n} threads" if n else "onnxruntime's default threads"
    import torch

    return f"{torch.get_num_threads()} threads"


def dynamic_dims(model: LoadedModel, rows: int = 1) -> dict[str, list[int]]:
    """Every named dim other than the batch runs at its minimum, the example's value and its maximum,
    with finite outputs whose dims of that name follow it."""
    sig = model.signature
    tried: dict[str, list[int]] = {}
    seen = {name: int(x.shape[i]) for spec, x in zip(sig.inputs, model.example_inputs)
            for i, name in enumerate(spec.shape) if isinstance(name, str)}
    for name, (lo, hi) in dim_ranges(model).items():
        if name == "batch":
            continue
        values = sorted({lo, min(max(seen.get(name, lo), lo), hi), min(hi, _MAX_DIM_TRY)})
        with step(f"dynamic dim {name}") as d:
            problems = []
            for v in values:
                problems += _dim_problems(model, name, v, rows)
                d.tick()
            tried[name] = values
            check(f"dynamic dim {name}", passed=not problems, value=", ".join(map(str, values)),
                  threshold=f"{lo}..{hi}", detail="; ".join(problems[:3]) or f"ran at batch {rows} with {name} = "
                  + ", ".join(map(str, values)))
    return tried


def _dim_problems(model: LoadedModel, name: str, v: int, rows: int) -> list[str]:
    """What is wrong with the model's answer at ``name = v`` (nothing: [])."""
    try:
        outs = run(model, make_inputs(model, rows, sizes={name: v}, seed=6))
    except Exception as exc:  # any failure inside the declared range is the finding
        return [f"{name}={v}: {_first_line(exc)}"]
    problems = []
    for spec, o in zip(model.signature.outputs, map(as_numpy, outs)):
        wrong = [i for i, d in enumerate(spec.shape) if d == name and i < o.ndim and o.shape[i] != v]
        if wrong or len(spec.shape) != o.ndim:
            problems.append(f"{name}={v}: output {spec.name} has shape {tuple(o.shape)}, "
                            f"signature {spec.describe()}")
        if _nonfinite(o):
            problems.append(f"{name}={v}: output {spec.name} is not finite")
    return problems


def wrong_shape(model: LoadedModel) -> str:
    """An input of the wrong shape is refused with an error, not answered.

    A static dim of the first input that has one is made one longer; a model whose dims are all
    dynamic gets an input with one dim too many.
    """
    sig = model.signature
    x = [as_numpy(t) for t in make_inputs(model, min(2, int(sig.max_batch)), seed=7)]
    spec_i, axis = next(((k, i) for k, s in enumerate(sig.inputs) for i, d in enumerate(s.shape)
                         if i and isinstance(d, int)), (0, None))
    if axis is not None:
        t = x[spec_i]
        x[spec_i] = np.concatenate([t, t.take([0], axis=axis)], axis=axis)
    else:
        x[spec_i] = x[spec_i][..., None]
    spec = sig.inputs[spec_i]
    message = ""
    with step("wrong shape is refused"):
        try:
            out = model(*native(model, x))
            refused, message = False, f"answered with {[tuple(o.shape) for o in outputs_of(model, out)]}"
        except Exception as exc:  # the refusal is what is checked; its message is the evidence
            refused, message = True, _first_line(exc)
        check("wrong shape is refused", passed=refused, value=str(tuple(x[spec_i].shape)),
              detail=f"expected {spec.describe()}; got {message}")
    return message


# --------------------------------------------------------------------------- quality on the user's data


def load_data(model: LoadedModel, path: str | Path, base: str | Path | None = None
              ) -> tuple[tuple[Array, ...], np.ndarray | None]:
    """An ``.npz`` whose arrays are named like the inputs, plus optional ``labels`` (never unpickled).
    A relative ``path`` is read in ``base`` (the gate's ``caller_dir``), else in the working directory."""
    p = under(base, path)
    if not p.is_file():
        raise GateError(f"data {str(path)!r} is not a file (looked for {p.resolve()}). Give the path of an .npz, "
                        "absolute or relative to the folder the gate was started in.")
    names = [s.name for s in model.signature.inputs]
    try:
        with np.load(p, allow_pickle=False) as z:
            have = list(z.files)
            missing = [n for n in names if n not in have]
            if missing:
                raise GateError(f"{p} has no array(s) {', '.join(missing)}; it holds {', '.join(have) or 'none'}. "
                                f"Save one array per input, named like the inputs ({', '.join(names)}), plus "
                                f"optional {LABELS!r}: np.savez(path, {', '.join(f'{n}=...' for n in names)}, "
                                f"{LABELS}=...).")
            arrays = {n: z[n] for n in names}
            labels = z[LABELS] if LABELS in have else None
    except (OSError, ValueError) as exc:
        raise GateError(f"Cannot read data {p}: {exc}. It must be an .npz of plain arrays.") from exc
    rows = {n: len(a) if a.ndim else 0 for n, a in arrays.items()}
    if len(set(rows.values())) != 1 or (labels is not None and len(labels) != next(iter(rows.values()))):
        raise GateError(f"{p}: arrays disagree on the number of rows ({rows}"
                        + (f", labels {len(labels)}" if labels is not None else "") + ").")
    if backend_of(model) == "onnxruntime":
        return tuple(np.ascontiguousarray(arrays[s.name], dtype=np.dtype(s.dtype)) for s in model.signature.inputs), labels
    import torch

    tensors = tuple(torch.from_numpy(np.ascontiguousarray(arrays[s.name])).to(getattr(torch, s.dtype))
                    for s in model.signature.inputs)
    return tensors, labels


def _output_index(model: LoadedModel, output: str | int | None) -> int:
    names = [s.name for s in model.signature.outputs]
    if output in (None, ""):
        return 0
    if isinstance(output, int) and 0 <= output < len(names):
        return output
    if output in names:
        return names.index(str(output))
    raise GateError(f"output={output!r} is not one of the model's outputs ({', '.join(names)}).")


def predict(model: LoadedModel, inputs: Sequence[Array], output: str | int | None = None) -> np.ndarray:
    """One output over all rows of ``inputs``, in chunks (bounded memory)."""
    k = _output_index(model, output)
    n = int(inputs[0].shape[0])
    step = max(1, min(_EVAL_CHUNK, int(model.signature.max_batch)))
    parts = [run(model, tuple(t[i:i + step] for t in inputs))[k] for i in range(0, n, step)]
    return np.concatenate([as_numpy(p) for p in parts])


def quality(model: LoadedModel, data: str | Path, *, metric: str = "", min_accuracy: float = 0.9,
            min_metric: float | None = None, max_metric: float | None = None,
            output: str | int | None = None, base: str | Path | None = None) -> float | None:
    """A quality check on the user's data (``data``: .npz, arrays named like the inputs + ``labels``).

    ``metric`` empty: accuracy against ``min_accuracy`` (needs labels). ``metric="module:function"``:
    ``function(outputs, labels)`` (numpy arrays; labels None without them) returns a number held to
    ``min_metric`` and/or ``max_metric``. Outputs are the first output unless ``output`` names one.
    Also checks that the outputs on the data are finite. Relative paths (``data``, a metric's file) are
    read in ``base``. Returns the score (None: nothing to score).
    """
    with step("quality on the data"):
        inputs, labels = load_data(model, data, base)
        out = predict(model, inputs, output)
        name = model.signature.outputs[_output_index(model, output)].name
        rows = f"{len(out)} rows of {Path(data).name}, output {name}"
        bad = int((~np.isfinite(out)).sum()) if np.issubdtype(out.dtype, np.inexact) else 0
        check("finite outputs on the data", passed=bad == 0, value=bad, threshold=0, detail=rows)
        if metric:
            if min_metric is None and max_metric is None:
                raise GateError(f"metric={metric!r} needs a threshold: min_metric=... (higher is better) or "
                                "max_metric=... (lower is better).")
            score = float(resolve_metric(metric, base)(out, labels))
            ok = np.isfinite(score) and (min_metric is None or score >= min_metric) and (
                max_metric is None or score <= max_metric)
            bound = " and ".join(x for x in (f">= {min_metric}" if min_metric is not None else "",
                                              f"<= {max_metric}" if max_metric is not None else "") if x)
            check(metric.rpartition(":")[2], passed=bool(ok), value=round(score, 6), threshold=bound, detail=rows)
            return score
        if labels is None:
            print(f"{Path(data).name} has no {LABELS!r} array: no accuracy check (add labels, or name a metric).")
            return None
        acc = accuracy(out, labels)
        check("accuracy", passed=acc >= min_accuracy, value=round(acc, 4), threshold=min_accuracy, detail=rows)
        return acc


def run_all(model: LoadedModel, *, data: str | Path | None = None, batch_n: int = 64,
            max_p95_ms_batch1: float | None = None, max_p95_ms_batch_n: float | None = None,
            latency_repeats: int = 50, **quality_args: Any) -> None:
    """Every check of the candidate alone, in the default notebook's order (for scripts and tests); the
    comparison with production is :func:`kit.gate.compare.against`."""
    parity(model)
    determinism(model)
    finite(model, rows=batch_n)
    batch_consistency(model)
    latency(model, batch_n=batch_n, max_p95_ms_batch1=max_p95_ms_batch1, max_p95_ms_batch_n=max_p95_ms_batch_n,
            repeats=latency_repeats)
    dynamic_dims(model)
    wrong_shape(model)
    if data:
        quality(model, data, **quality_args)
