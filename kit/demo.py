"""The embedded demo: a small digits classifier taken through the whole kit (``make demo``).

Also the shared source of the demo model and its data split, used by the quickstart and the benchmarks,
so all of them see the same held-out rows. The gate gets them as data (:func:`save_split`): nothing in
the gate knows the demo.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEMO_MODEL = "demo-digits"
DEMO_SERVICE = "demo"
SPLIT_SEED = 0


class DigitsMLP(nn.Module):
    """64 -> 256 -> 256 -> 10: the benchmark MLP, trained on scikit-learn's bundled 8x8 digits."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_split(test_fraction: float = 0.25, seed: int = SPLIT_SEED) -> Split:
    """scikit-learn's digits (bundled, no download), scaled to [0, 1], split deterministically."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = idx[:n_test], idx[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def save_split(path: Path, split: Split | None = None) -> Path:
    """Write the held-out rows as .npz for the default gate's ``data`` parameter: one array named like
    the model's input (``pixels``) and ``labels``."""
    from kit._io import atomic_write_bytes

    split = split or digits_split()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, pixels=split.x_test, labels=split.y_test)
    atomic_write_bytes(path, buf.getvalue())
    return path


def train(epochs: int = 30, seed: int = 0, hidden: int = 256, split: Split | None = None) -> tuple[DigitsMLP, float]:
    """Train the MLP; returns the model (eval mode) and its held-out accuracy."""
    split = split or digits_split()
    torch.manual_seed(seed)
    model = DigitsMLP(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    return model, accuracy(model, split)


def accuracy(model: Any, split: Split) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(split.x_test)).argmax(1).numpy()
    return float((pred == split.y_test).mean())


def _step(n: int, total: int, msg: str) -> float:
    print(f"==> [{n}/{total}] {msg}", flush=True)
    return time.perf_counter()


def _done(t: float, msg: str) -> None:
    print(f"    {msg} ({time.perf_counter() - t:.1f}s)", flush=True)


def _predict(url: str, key: str, rows: list[list[float]]) -> dict[str, Any]:
    import json
    import urllib.request

    req = urllib.request.Request(
        url + "/predict", data=json.dumps({"inputs": rows}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> None:
    """``make demo``: train, capture, register, validate, promote, serve, predict, stop, pack."""
    import argparse
    import hashlib
    import sys

    from click.testing import CliRunner

    from kit.cli import cli
    from kit.config import load_config
    from kit.gate import run_gate
    from kit.pack import pack
    from kit.registry import Registry
    from kit.servicegen import generate, start_service
    from kit.traffic import register_service_guard

    ap = argparse.ArgumentParser(prog="python -m kit.demo", description=main.__doc__)
    ap.add_argument("--no-pack", action="store_true", help="stop after the service answered")
    args = ap.parse_args(argv)
    total = 7 if args.no_pack else 8

    cfg = load_config()
    reg = Registry.from_config(cfg)
    services = cfg.project_root / "services"
    dist = cfg.project_root / "dist"
    t_all = time.perf_counter()

    t = _step(1, total, "train a digits MLP on scikit-learn's bundled digits (local data)")
    split = digits_split()
    model, acc = train(split=split)
    _done(t, f"held-out accuracy {acc:.3f}")

    t = _step(2, total, f"capture with torch.export and register {DEMO_MODEL!r} in {reg.root}")
    mv = reg.register(DEMO_MODEL, model, torch.from_numpy(split.x_test[:1]), metrics={"accuracy": acc},
                      tags={"dataset": "sklearn-digits"}, project_root=cfg.project_root)
    _done(t, f"registered {mv.ref}, sha256 {mv.short_sha}, {mv.size_bytes / 1024:.0f} KiB")

    t = _step(3, total, f"validate {mv.ref} with the default gate notebook and the held-out rows (papermill)")
    data = save_split(cfg.project_root / ".kit" / "demo" / "digits-heldout.npz", split)
    gate = run_gate(reg, mv.name, mv.version, params={"data": str(data)}, timeout=cfg.gate_timeout,
                    progress=lambda line: print(f"    {line}", flush=True))
    for c in gate.checks:
        print(f"    {c.line()}")
    _done(t, f"gate {'PASSED' if gate.passed else 'FAILED'}; report {gate.report}")
    if not gate.passed:
        sys.exit(f"demo: the gate failed ({gate.error or 'a check failed'}); see {gate.report}")

    t = _step(4, total, f"promote {mv.ref} to production")
    aliases = reg.promote(mv.name, mv.version, why="make demo", user=cfg.user)
    _done(t, f"production={aliases.production} (previous: {list(aliases.previous) or 'none'})")
    print(CliRunner().invoke(cli, ["--registry", str(reg.root), "models", DEMO_MODEL]).output, end="")

    t = _step(5, total, f"generate the service services/{DEMO_SERVICE}/")
    key = "demo-key"
    svc_dir = generate(DEMO_SERVICE, DEMO_MODEL, registry=reg.location, out_dir=services, force=True,
                       api_keys_sha256=[hashlib.sha256(key.encode()).hexdigest()],
                       trusted_keys=reg.keyring.service_keys() if reg.keyring is not None else ())
    guard = register_service_guard(reg, svc_dir, user=cfg.user)  # its canary guard may end demo canaries
    _done(t, f"wrote {svc_dir}; canary guard key {guard} registered")

    t = _step(6, total, "start it with gunicorn on 127.0.0.1 and ask for a prediction")
    with start_service(svc_dir) as svc:
        _done(t, f"ready at {svc.url} in {svc.started_seconds:.1f}s")
        t = _step(7, total, "POST /predict with five held-out digits")
        rows = split.x_test[:5]
        out = _predict(svc.url, key, rows.tolist())
        pred = np.asarray(out["outputs"]).argmax(1).tolist()
        print(f"    served by version {out['model_version']}: predicted {pred}, true {split.y_test[:5].tolist()}")
        print(f"    try it: curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
              f"-d '{{\"inputs\": [[0.0, ...64 values]]}}' {svc.url}/predict")
    _done(t, "service stopped cleanly")

    if not args.no_pack:
        t = _step(8, total, f"pack the environment, the service and its models into {dist}/")
        res = pack(svc_dir, out_dir=dist, registry=reg.root, progress=lambda line: print(f"    {line}", flush=True))
        _done(t, f"{res.archive} ({res.size_bytes / 2**20:.0f} MiB, {res.kind} environment)")
        print(f"    ship it: scp {res.archive} server: && ssh server 'tar xzf {res.archive.name} && "
              f"./{res.root}/run.sh'")
    print(f"demo finished in {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
