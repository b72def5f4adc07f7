"""The registry under real concurrent processes and SIGKILL (no mocks)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


from kit.registry import Registry

CHILD = Path(__file__).with_name("registry_child.py")


def spawn(root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(root), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_consistent(reg: Registry, name: str = "m") -> list[int]:
    nums = [mv.version for mv in reg.versions(name)]
    assert nums == list(range(1, len(nums) + 1)), f"versions not contiguous: {nums}"
    assert all(r.ok for r in reg.verify(name)), reg.verify(name)
    registers = [e for e in reg.history(name) if e["event"] == "register"]
    assert sorted(e["version"] for e in registers) == nums
    return nums


def test_concurrent_registrations_lose_nothing(tmp_path):
    root = tmp_path / "reg"
    procs = [spawn(root, "-n", "3") for _ in range(4)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        got += [int(x) for x in out.split()]
    assert sorted(got) == list(range(1, 13)), "each registration must get its own version"
    reg = Registry(root)
    assert assert_consistent(reg) == list(range(1, 13))
    owners = {(mv.tags["pid"], mv.tags["i"]) for mv in reg.versions("m")}
    assert len(owners) == 12


def test_sigkill_just_before_the_rename_leaves_no_partial_version(tmp_path):
    root = tmp_path / "reg"
    Registry(root).register("m", *_tiny())
    flag = tmp_path / "paused"
    p = spawn(root, "--pause-before-rename", str(flag))
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "child never reached the rename"
        time.sleep(0.05)
    tmp_dir = Path(flag.read_text())
    assert tmp_dir.is_dir() and (tmp_dir / "meta.json").is_file(), "the version was complete, only unrenamed"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)  # reaps the child and closes its pipes
    reg = Registry(root)
    assert assert_consistent(reg) == [1], "the killed registration must not be visible"
    # the lock is free again and the next registration takes version 2 and sweeps the debris
    mv = reg.register("m", *_tiny())
    assert mv.version == 2 and not tmp_dir.exists()
    assert_consistent(reg)


def test_sigkill_at_random_points_keeps_the_registry_usable(tmp_path):
    root = tmp_path / "reg"
    rng = random.Random(1234)
    for _ in range(4):
        p = spawn(root, "-n", "5")
        time.sleep(rng.uniform(1.5, 4.0))  # interpreter + torch import take ~1.5 s
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    reg = Registry(root)
    if (root / "m" / "versions").is_dir():
        assert_consistent(reg)
    before = len(reg.versions("m")) if (root / "m" / "versions").is_dir() else 0
    assert reg.register("m", *_tiny()).version == before + 1
    assert_consistent(reg)
    aliases = root / "m" / "aliases.json"
    assert not aliases.exists() or json.loads(aliases.read_text())


def _tiny():
    import torch
    from torch import nn

    return nn.Linear(4, 2), torch.randn(1, 4)
