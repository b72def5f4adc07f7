"""Does the gate's latency verdict move with the machine's load? The old absolute budget vs the ratio to production.

Three versions of one classifier (tests/gate_models.py: wide@1; wide@2, slightly moved weights; wide@3, the
wide@2 net doing its work three times). Per condition (``idle``, then ``busy``: one ``while True: pass``
process per core beside the measurement; ``crowded``: two per core, as a CI runner's parallel test workers),
``--trials`` times:

- ``old``: what the gate did before: p95 of 50 single calls of wide@2 at batch 1 and batch 64, judged
  against the old default budgets (50 ms, 200 ms);
- ``new``: :func:`kit.gate.compare.latency` of wide@2 and of wide@3 against wide@1 (interleaved rounds,
  a breach only when both the fastest calls' ratio and the median per-round ratio are over 1.25x), at
  batch 1 and 64; ``fastest`` and ``rounds``: each of the two estimates alone on the same calls.

Reported side by side: the old p95s and how often the old verdict was a pass, the new ratios and how often
each new verdict was a pass (wide@2 should always pass, wide@3 always fail). Writes
benchmarks/results/gate_under_load.json and prints it. Takes a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import gate_models as gm  # noqa: E402  (the test models, from tests/)

from kit.gate import compare, suite  # noqa: E402
from kit.registry import Registry  # noqa: E402

OLD_BUDGETS = {1: 50.0, 64: 200.0}


def _trial(models: list[Any]) -> dict[str, Any]:
    v1, v2, v3 = models
    out: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the checks' own lines
        for rows, budget in OLD_BUDGETS.items():
            p95, _ = suite._p95_ms(v2, suite.make_inputs(v2, rows, seed=rows), 50)
            out[f"old_p95_ms_batch{rows}"] = round(p95, 3)
            out[f"old_pass_batch{rows}"] = p95 <= budget
        for name, cand in (("v2", v2), ("v3", v3)):
            for cmp in compare.latency(cand, v1, batch_n=64, rounds=30):
                out[f"new_{name}_ratio_batch{cmp.batch}"] = round(cmp.ratio, 3)
                out[f"new_{name}_pass_batch{cmp.batch}"] = cmp.passed  # the rule: a breach when both see it
                out[f"fastest_{name}_pass_batch{cmp.batch}"] = cmp.fastest_passed
                out[f"rounds_{name}_ratio_batch{cmp.batch}"] = round(cmp.round_ratio, 3)  # the rule before
                out[f"rounds_{name}_pass_batch{cmp.batch}"] = cmp.rounds_passed
    return out


def _summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"trials": len(trials)}
    for key in trials[0]:
        values = [t[key] for t in trials]
        if isinstance(values[0], bool):
            s[key.replace("_pass_", "_passes_")] = f"{sum(values)}/{len(values)}"
        else:
            s[key] = {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}
    return s


def _loaded(models: list[Any], trials: int, loops: int) -> dict[str, Any]:
    """``trials`` trials beside ``loops`` busy loops (a CI runner's parallel test workers)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(loops)]
    try:
        return _summary([_trial(models) for _ in range(trials)])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "registry", require_gate=False)
        for m in gm.versions():
            reg.register("wide", m, gm.example(), onnx=False)
        models = [reg.load("wide", v) for v in (1, 2, 3)]
        results: dict[str, Any] = {"cpus": os.cpu_count(), "threads": suite._threads(models[0]),
                                   "old_budgets_ms": OLD_BUDGETS}
        results["idle"] = _summary([_trial(models) for _ in range(args.trials)])
        for condition, per_core in (("busy", 1), ("crowded", 2)):
            results[condition] = _loaded(models, args.trials, per_core * (os.cpu_count() or 2))
    out = Path(__file__).resolve().parent / "results" / "gate_under_load.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
