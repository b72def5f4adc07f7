"""A researcher's deploy script, run by tests/zoo/real_deploy.py with the python of a venv holding Kit's
installed wheel (never this checkout's kit), in a project folder that holds this file, the model code
(``zoo/``, copied from tests/zoo) and a kit.toml naming ``registry = "registry"``.

``python deploy_zoo.py MODEL`` does what ``%deploy MODEL --promote`` does (kit.deploy.deploy: capture, register
signed with the configured key, the default gate without force, promote), for v1 and a v2 (the last bias
nudged) gated against v1 as production; where capture exported ONNX, gates the
production version on onnxruntime too; generates a service per backend. Prints one JSON line: what the
test checks (the gates, the capture record, each service's folder, the seconds of each step).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import kit
from kit.config import load_config
from kit.deploy import deploy
from kit.gate import render_text, run_gate
from kit.registry import Registry
from kit.servicegen import generate
from zoo.real import REAL, RealEntry, nudged

# The packaged default notebook and thresholds; only the rows of the finite/agreement checks and the batch of
# the latency comparison (64 by default) and the number of timed calls are smaller, so that ResNet-18 at batch
# 64 does not spend minutes of two shared cores per gate.
GATE_PARAMS = {"batch_n": 8, "latency_repeats": 10}


def _gate_doc(g: Any) -> dict[str, Any]:
    return {"passed": g.passed, "baseline": g.baseline["version"], "checks": [c.name for c in g.checks],
            "text": render_text(g)}


def _deploy(reg: Registry, z: RealEntry, version: int, report: dict[str, Any]) -> bool:
    """%deploy of v1 (or v2: the nudged model); True when it was promoted."""
    model = z.model() if version == 1 else nudged(z.model())
    r = deploy(reg, model, z.example(), z.name, params=GATE_PARAMS, promote=True, gate_timeout=600,
               dynamic=z.dynamic or None, dims=z.dims or None, progress=False)
    assert r.version is not None and r.version.version == version, [s.line(i + 1) for i, s in enumerate(r.steps)]
    report["times"][f"deploy_v{version}"] = {s.name: round(s.seconds, 1) for s in r.steps}
    report["times"][f"deploy_v{version}_parts"] = {s.name: dict(s.parts) for s in r.steps if s.parts}
    if r.gate is not None:
        report["gates"][str(version)] = _gate_doc(r.gate)
    return r.aliases is not None and r.aliases.production == version


def main(name: str) -> None:
    z = next(e for e in REAL if e.name == name)
    reg = Registry.from_config(load_config())  # signs with the configured key (KIT_KEYS_DIR)
    report: dict[str, Any] = {"kit": kit.__file__, "gates": {}, "times": {}, "services": {}}
    production = 1 if _deploy(reg, z, 1, report) else 0
    if production and _deploy(reg, z, 2, report):
        production = 2
    report["production"] = production
    mv = reg.get(z.name, max(production, 1))  # what serves (or v1, when its gate failed)
    report.update(onnx=mv.capture["onnx"], parity=mv.capture["parity"], output_kind=mv.signature["output_kind"])
    backends = ("torch", "onnxruntime") if mv.capture["onnx"]["exported"] else ("torch",)
    for backend in backends if production else ():
        if backend == "onnxruntime":  # the verdict is per backend: gate the production version on the one that serves
            t0 = time.perf_counter()
            g = run_gate(reg, z.name, production, params=GATE_PARAMS, timeout=600, backend=backend)
            report["times"]["gate_onnxruntime_s"] = round(time.perf_counter() - t0, 1)
            report["gates"]["onnxruntime"] = _gate_doc(g)
        svc = generate(f"{z.name}-{backend}", z.name, registry=reg.location, out_dir=Path("services"), workers=1,
                       threads=2, backend=backend, trusted_keys=reg.keyring.service_keys())
        report["services"][backend] = str(svc.resolve())
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
