"""What ``%deploy`` of a ResNet-18 at 224 px costs, step by step, with the default gate (issue 19).

The model is torchvision's resnet18 (its published definition, copied in tests/zoo/tv_cnn.py: torchvision
does not import beside this CPU torch), random weights, eval mode, an example of ``--batch`` images
3x224x224. Two runs, each in a fresh project folder (kit.toml naming ``registry/``, a fresh key folder):

- ``split``: ``kit.deploy.deploy`` in this process (what ``%deploy`` calls), with ``--promote`` and a
  service, timed per step. The capture step is split by timing Kit's own functions from outside:
  ``torch.export`` (``kit.capture._export``), parity against eager (``kit.capture._parity_checks``) and the
  ONNX export with its onnxruntime check (``kit.backends.onnx.export.export_onnx``). Each step's CPU
  seconds (this process and the gate's kernel, ``getrusage``) are written beside its wall time: on a
  shared machine they say what the step costs whatever the load. Then, beyond
  ``%deploy``: the generated service started under gunicorn on 127.0.0.1 and its first answer.
- ``notebook``: a real notebook run by papermill (a fresh kernel): cell 1 builds the model, cell 2 is
  ``%deploy model --example x --name resnet18 --promote --service resnet18``. The %deploy cell's time is
  papermill's record; the kernel's start and imports are reported apart.

The machine's load (1-minute load average before and after, CPU count) is written beside the figures:
the issue's budget (< 60 s) is for an idle 2-core machine. Writes benchmarks/results/deploy_resnet18.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))


def _project(base: Path) -> Path:
    base.mkdir(parents=True)
    (base / "kit.toml").write_text('registry = "registry"\n')
    return base


def _timed(owner: Any, attr: str, into: dict[str, float], key: str) -> Callable[[], None]:
    """Wrap ``owner.attr`` so its time adds to ``into[key]``; returns the undo."""
    orig = getattr(owner, attr)

    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - t0

    setattr(owner, attr, wrapper)
    return lambda: setattr(owner, attr, orig)


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children (the gate's kernel)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def split(work: Path, batch: int) -> dict[str, Any]:
    import torch
    from zoo.tv_cnn import resnet18

    import kit.backends.onnx.export as onnx_export
    import kit.capture as capture_mod
    from kit.config import load_config
    from kit.deploy import deploy
    from kit.registry import Registry
    from kit.servicegen import start_service

    project = _project(work / "split")
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(batch, 3, 224, 224)
    inner: dict[str, float] = {}
    undo = [_timed(capture_mod, "_export", inner, "torch.export"),
            _timed(capture_mod, "_parity_checks", inner, "parity"),
            _timed(onnx_export, "export_onnx", inner, "onnx export + onnxruntime check")]
    try:
        reg = Registry.from_config(load_config(project))
        cpu: dict[str, float] = {}
        last = [_cpu_s()]

        def on_step(_: int, step: Any) -> None:  # CPU seconds per step: what the load does not change
            now = _cpu_s()
            cpu[step.name] = round(now - last[0], 2)
            last[0] = now

        t0 = time.perf_counter()
        result = deploy(reg, model, x, "resnet18", promote=True, service="resnet18", services_dir=project / "services",
                        project_root=project, on_step=on_step)
        total = time.perf_counter() - t0
    finally:
        for u in undo:
            u()
    steps = {s.name: round(s.seconds, 2) for s in result.steps}
    capture_rest = steps["capture"] - sum(inner.values())
    out: dict[str, Any] = {
        "deploy_total_s": round(total, 2),
        "steps_s": steps,
        "steps_cpu_s": cpu,
        "capture_split_s": {**{k: round(v, 2) for k, v in inner.items()}, "signature, rest": round(capture_rest, 2)},
        "gate": {"passed": result.gate.passed, "checks": [c.name for c in result.gate.checks],
                 "compared_with": result.gate.baseline},
    }
    t0 = time.perf_counter()
    with start_service(result.service_dir, timeout=300) as running:
        ready = time.perf_counter() - t0
        body = json.dumps({"inputs": {"x": x[:1].tolist()}}).encode()
        req = urllib.request.Request(running.url + "/predict", data=body, headers={"Content-Type": "application/json"})
        t1 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        first = time.perf_counter() - t1
    with torch.no_grad():
        want = model(x[:1])
    diff = float((torch.tensor(answer["outputs"]) - want).abs().max())
    out["after_deploy_s"] = {"service ready (gunicorn, 1 worker)": round(ready, 2),
                             "first answer": round(first, 3)}
    out["served_max_abs_diff_vs_eager"] = diff
    return out


NOTEBOOK_CELLS = [
    "import sys, time\n_t0 = time.perf_counter()\nsys.path.insert(0, {tests!r})\nimport torch\n"
    "from zoo.tv_cnn import resnet18\n%load_ext kit\ntorch.manual_seed(0)\nmodel = resnet18().eval()\n"
    "x = torch.randn({batch}, 3, 224, 224)\nprint(f'imports and model: {{time.perf_counter() - _t0:.1f}}s')",
    "result = %deploy model --example x --name resnet18 --promote --service resnet18\nresult",
]


def notebook(work: Path, batch: int) -> dict[str, Any]:
    import nbformat
    import papermill

    project = _project(work / "notebook")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c.format(tests=str(ROOT / "tests"), batch=batch)) for c in NOTEBOOK_CELLS]
    src, dst = project / "deploy.ipynb", project / "deploy.out.ipynb"
    nbformat.write(nb, src)
    t0 = time.perf_counter()
    papermill.execute_notebook(str(src), str(dst), kernel_name="python3", cwd=str(project), progress_bar=False)
    wall = time.perf_counter() - t0
    done = nbformat.read(dst, as_version=4)
    durations = [round(float(c.metadata["papermill"]["duration"]), 2) for c in done.cells]
    # printed step lines, and the gate's line (a display updated in place with the gate's progress)
    text = "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in done.cells[1].outputs)
    return {"papermill_wall_s": round(wall, 2), "model_cell_s": durations[0], "deploy_cell_s": durations[1],
            "kernel_start_and_rest_s": round(wall - sum(durations), 2),
            "deploy_lines": [ln for ln in text.splitlines() if re.match(r"\[\d/5\] ", ln)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="images in the example (default 4)")
    ap.add_argument("--skip-notebook", action="store_true", help="only the in-process split")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "deploy_resnet18.json")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kit-deploy-bench-") as tmp:
        os.environ.setdefault("KIT_KEYS_DIR", str(Path(tmp) / "keys"))
        os.environ["KIT_CACHE_DIR"] = str(Path(tmp) / "cache")
        results: dict[str, Any] = {"model": "resnet18 (torchvision definition, random weights), 224 px",
                                   "example_batch": args.batch, "cpus": os.cpu_count(),
                                   "load_avg_1m_before": round(load_before, 2)}
        results["split"] = split(Path(tmp), args.batch)
        if not args.skip_notebook:
            results["notebook"] = notebook(Path(tmp), args.batch)
    results["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
