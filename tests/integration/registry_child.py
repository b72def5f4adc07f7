"""A child process for the registry process tests: registers N versions of a tiny model.

``--pause-before-rename FILE``: create FILE, then sleep just before the version folder is renamed into
place (the parent kills the process there with SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from kit.registry import Registry

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--name", default="m")
p.add_argument("-n", type=int, default=1)
p.add_argument("--pause-before-rename")
args = p.parse_args()

if args.pause_before_rename:
    real_rename = os.rename

    def slow_rename(src, dst):  # type: ignore[no-untyped-def]
        Path(args.pause_before_rename).write_text(str(src))
        time.sleep(60)
        real_rename(src, dst)

    os.rename = slow_rename  # type: ignore[assignment]

reg = Registry(args.root, user=f"pid{os.getpid()}")
for i in range(args.n):
    torch.manual_seed(os.getpid() * 100 + i)
    mv = reg.register(args.name, nn.Linear(4, 2), torch.randn(1, 4), tags={"pid": os.getpid(), "i": i},
                      onnx=False)  # concurrency is the point here; the ONNX exporter costs seconds per process
    print(mv.version, flush=True)
