"""Large-weights benchmark: a ~400 MB model (100.7M float32 parameters) through register, verify, load, the
default gate and a real 2-worker gunicorn service, with each worker's RSS and USS (unique memory:
Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) and the state of its mapping of model.pt2.

Kit maps a version's weights read-only from model.pt2 (kit.backends.pt2.archive), so both workers share one copy in
the page cache. What a worker adds for the model is its USS minus that of a worker of the same service
around a 5K-parameter model (the baseline: torch's runtime); the target is at most 25% of the weight size.
Writes benchmarks/results/large_model.json and prints it. Takes about two minutes and ~2 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate, start_service

HERE = Path(__file__).resolve().parent
MODEL = "large"


def large_model(seed: int = 0) -> nn.Module:
    """512 -> 8192 -> 8192 -> 3584 -> 10: 100.7M float32 parameters, 403 MB."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 8192), nn.ReLU(), nn.Linear(8192, 8192), nn.ReLU(),
                         nn.Linear(8192, 3584), nn.ReLU(), nn.Linear(3584, 10)).eval()


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS of one process in bytes, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def file_mapping(pid: int, name: str) -> dict[str, int]:
    """Rss / Shared_Clean / Private_Clean of the mappings of ``name`` (the weights) in one process."""
    out = {"rss": 0, "shared_clean": 0, "private_clean": 0, "private_dirty": 0}
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = line.rstrip().endswith(name)
        elif current and head[0].rstrip(":").lower() in out:
            out[head[0].rstrip(":").lower()] += int(head[1]) * 1024
    return out


def workers_of(master: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int(next(line for line in (p / "status").read_text().splitlines() if line.startswith("PPid:")).split()[1])
            except (OSError, StopIteration):
                continue
            if ppid == master:
                kids.append(int(p.name))
    return sorted(kids)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _readyz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/readyz", timeout=30) as r:
        return json.loads(r.read())


# The default gate's latency budgets are for small models; a 100M-parameter MLP on a shared CPU gets its own.
GATE_PARAMS = {"max_p95_ms_batch1": 2000.0, "max_p95_ms_batch_n": 10000.0, "batch_n": 8, "latency_repeats": 5}


def _serve(reg: Registry, model: str, root: Path, workers: int, x: list[list[float]]) -> dict[str, Any]:
    """Start ``model``'s service, answer from every worker, and read each worker's memory."""
    d = generate(model, model, registry=reg.root, out_dir=root / "services", workers=workers, threads=2,
                 timeout=300, max_artifact_bytes=1 << 30)
    t = time.perf_counter()
    with start_service(d, timeout=300) as running:
        ready_s = time.perf_counter() - t
        t = time.perf_counter()
        first = _post(running.url + "/predict", {"inputs": x})
        first_s = time.perf_counter() - t
        time.sleep(3)  # let every worker finish its load and warm-up
        for _ in range(8 * workers):
            _post(running.url + "/predict", {"inputs": x})
        pids = workers_of(running.pid)
        mem: dict[str, dict[str, Any]] = {str(p): {**memory(p), "model_pt2_mapping": file_mapping(p, "model.pt2")}
                                          for p in pids}
        return {"ready_s": ready_s, "first_s": first_s, "first": first, "per_worker": mem,
                "master": memory(running.pid), "readyz": _readyz(running.url)}


def run(root: Path, workers: int = 2, *, onnx: bool = True) -> dict[str, Any]:
    """The measurements; ``onnx=False`` registers without exporting model.onnx (the services serve torch; the
    export of the big model costs seconds and another 400 MB saved, copied and hashed at register)."""
    model = large_model()
    n_params = sum(p.numel() for p in model.parameters())
    example = torch.rand(2, 512, generator=torch.Generator().manual_seed(1))
    reg = Registry(root / "registry", require_gate=True, user="bench")
    t = time.perf_counter()
    mv = reg.register(MODEL, model, example, onnx=onnx)
    register_s = time.perf_counter() - t
    t = time.perf_counter()
    ok = all(r.ok for r in reg.verify(MODEL, mv.version))
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    loaded = reg.load(MODEL, mv.version)
    load_s = time.perf_counter() - t
    check = loaded.check_reference() if hasattr(loaded, "check_reference") else None
    del loaded
    from kit.gate import run_gate

    t = time.perf_counter()
    gate = run_gate(reg, MODEL, mv.version, params=GATE_PARAMS)
    gate_s = time.perf_counter() - t
    if gate.passed:
        reg.promote(MODEL, mv.version)
    else:  # still measure serving; the result says the gate failed
        reg.promote(MODEL, mv.version, force=True, why=f"benchmark: gate failed: {gate.error}")
    # the same service around a 5K-parameter model: what a worker holds without big weights
    reg.register("baseline", nn.Sequential(nn.Linear(512, 10)), example, onnx=onnx)
    reg.promote("baseline", 1, force=True, why="benchmark baseline")
    x = example[:1].tolist()
    base = _serve(reg, "baseline", root, workers, x)
    big = _serve(reg, MODEL, root, workers, x)
    weight_bytes = (mv.path / "model.pt2").stat().st_size
    mem = big["per_worker"]
    base_uss = max(int(m["uss"]) for m in base["per_worker"].values())
    added = sorted(int(m["uss"]) - base_uss for m in mem.values())
    return {
        "params": n_params, "model_pt2_bytes": weight_bytes, "workers": len(mem), "verified": ok,
        "reference_check": str(check) if check is not None else None,
        "onnx": onnx, "register_s": round(register_s, 2), "verify_s": round(verify_s, 2), "load_s": round(load_s, 2),
        "gate_passed": gate.passed, "gate_s": round(gate_s, 2), "gate_error": gate.error, "gate_params": GATE_PARAMS,
        "service_ready_s": round(big["ready_s"], 2), "first_answer_s": round(big["first_s"], 3),
        "first_answer_version": big["first"].get("model_version"), "readyz_status": big["readyz"].get("status"),
        "master": big["master"], "per_worker": mem, "baseline_per_worker": base["per_worker"],
        "added_uss_per_worker": added,
        "max_added_uss_over_weights": round(added[-1] / weight_bytes, 4) if added else None,
        "target": "a worker's USS above the baseline service's <= 0.25 x model.pt2 (and 0 private bytes of weights)",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "large_model.json")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kit-large-") as tmp:
        result = run(Path(tmp), args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
