"""A full or read-only disk under register and alias moves: one `kit: error:` line naming the folder and the
space needed, never SIGABRT (torch's archive writer aborts the process on ENOSPC) nor a traceback; the
Python process (a notebook kernel running %deploy) survives; nothing half-written is left (real tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from fs_faults import fill, remount, small_tmpfs
from kit_testing import project_keyring
from torch import nn

from kit.errors import StorageError
from kit.registry import Registry

pytestmark = pytest.mark.timeout(300)

_REGISTER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from kit.errors import KitError
    from kit.registry import Registry
    reg = Registry(sys.argv[1], cache_dir=sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()  # 2 MiB of weights
    try:
        reg.register("big", model, torch.randn(4, 512))
    except KitError as exc:
        print(f"kit: error: {exc}")
    print("alive")
""")


def test_register_on_a_full_disk_is_one_line_and_the_process_lives(tmp_path):
    """Before: SIGABRT (rc -6) from torch's archive writer and a C++ trace, no `kit: error:` line."""
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        out = subprocess.run([sys.executable, "-c", _REGISTER, str(disk / "reg"), str(disk / "cache")],
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        assert lines[-1] == "alive" and len(lines) == 2, out.stdout
        assert lines[0].startswith("kit: error: Cannot write a new version of 'big'") and str(disk / "reg") in lines[0]
        assert "free" in lines[0] and "MiB" in lines[0]
        assert "terminate called" not in out.stderr and "c10::Error" not in out.stderr
        assert not list(disk.rglob("*.pt2")), "nothing half-written is left"


def test_a_disk_filling_during_register_is_one_storage_error_and_leaves_no_version(tmp_path, monkeypatch):
    """The check passed but the disk filled meanwhile: the copy's ENOSPC is one line, the temp folder goes."""
    import kit.registry.store as store

    monkeypatch.setattr(store, "check_register_space", lambda *a, **k: 1)  # the race: space vanished after it
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        reg = Registry(disk / "reg", cache_dir=tmp_path / "cache")  # the private save fits; the registry not
        torch.manual_seed(0)
        with pytest.raises(StorageError, match=r"Cannot write a new version of 'big': .*reg/big is full") as ei:
            reg.register("big", nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 10)), torch.randn(2, 512))
        assert "\n" not in str(ei.value)
        assert not [p for p in (disk / "reg" / "big").iterdir() if p.name.startswith(".tmp-")]
        assert not list((disk / "reg" / "big" / "versions").iterdir())


def _kit(reg_root, *args, env=None):
    return subprocess.run([sys.executable, "-c", "from kit.cli import main; main()", "--registry", str(reg_root), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def _one_error_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kit: error: "), out.stderr
    assert "Traceback" not in out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def moved_registry(tmp_path):
    """A signed registry on its own 8 MiB tmpfs: two versions of a tiny model, v1 in production."""
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        reg = Registry(disk / "reg", keyring=project_keyring(), cache_dir=tmp_path / "cache")
        for s in range(2):
            torch.manual_seed(s)
            reg.register("m", nn.Linear(4, 2).eval(), torch.randn(1, 4))
        reg.promote("m", 1, force=True, why="test")
        yield disk, reg


def test_moves_on_a_full_disk_are_one_line_and_move_nothing(moved_registry):
    """Before: a Python traceback (OSError ENOSPC) out of `kit promote`."""
    disk, reg = moved_registry
    filler = fill(disk)
    line = _one_error_line(_kit(reg.root, "promote", "m@2", "--force", "--why", "full"),
                           "Cannot write m's move record 2", str(reg.root / "m"), "free")
    assert "needs" in line
    assert reg.aliases("m").production == 1 and not list((reg.root / "m" / "moves").glob(".*.tmp"))
    filler.unlink()
    out = _kit(reg.root, "promote", "m@2", "--force", "--why", "space again", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["aliases"]["production"]["version"] == 2


def test_moves_on_a_read_only_registry_are_one_line(moved_registry):
    disk, reg = moved_registry
    remount(disk, "ro")
    try:
        _one_error_line(_kit(reg.root, "promote", "m@2", "--force", "--why", "ro"), "read-only", str(reg.root / "m"))
        assert reg.aliases("m").production == 1  # reading a read-only registry still works
    finally:
        remount(disk, "rw")


def test_a_move_sweeps_what_killed_moves_left(moved_registry):
    disk, reg = moved_registry
    model_dir = reg.root / "m"
    old = time.time() - 3600
    debris = [model_dir / "moves" / ".2.0badc0ffee0.tmp", model_dir / ".aliases.json.x1y2z3.tmp"]
    fresh = model_dir / ".aliases.json.fresh.tmp"  # a writer that takes no lock, still writing: spared
    for p in [*debris, fresh]:
        p.write_bytes(b"half")
    for p in debris:
        os.utime(p, (old, old))
    reg.promote("m", 2, force=True, why="sweep")
    assert not any(p.exists() for p in debris) and fresh.exists()
