"""The embedded demo: a small digits classifier taken through the whole kit (``make demo``).

Also the shared source of the demo model and its data split, used by the validation notebook,
the quickstart and the benchmarks, so all of them see the same held-out rows.
"""

from __future__ import annotations

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
    """Write the held-out rows as .npz (what a validation notebook's ``data`` parameter points at)."""
    split = split or digits_split()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=split.x_test, y=split.y_test)
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


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.perf_counter()


def main() -> None:
    """``make demo``: train, capture, register and list the demo model."""
    from kit.config import load_config
    from kit.registry import Registry

    cfg = load_config()
    reg = Registry.from_config(cfg)

    t = _step("train a digits MLP on scikit-learn's bundled digits (local data)")
    split = digits_split()
    model, acc = train(split=split)
    print(f"    held-out accuracy {acc:.3f} in {time.perf_counter() - t:.1f}s")

    t = _step(f"capture with torch.export and register as {DEMO_MODEL!r} in {reg.root}")
    mv = reg.register(DEMO_MODEL, model, torch.from_numpy(split.x_test[:1]), metrics={"accuracy": acc},
                      tags={"dataset": "sklearn-digits"}, project_root=cfg.project_root)
    print(f"    registered {mv.ref} sha256 {mv.short_sha} ({mv.size_bytes / 1024:.0f} KiB) "
          f"in {time.perf_counter() - t:.1f}s")

    _step(f"kit models {DEMO_MODEL}")
    from click.testing import CliRunner

    from kit.cli import cli

    res = CliRunner().invoke(cli, ["--registry", str(reg.root), "models", DEMO_MODEL])
    print(res.output, end="")


if __name__ == "__main__":
    main()
