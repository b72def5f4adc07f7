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
    return subprocess.Popen([sys.executable, str(CHILD), str(root), *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_consistent(reg: Registry, name: str = "m") -> list[int]:
    nums = [mv.version for mv in reg.versions(name)]
    assert nums == list(range(1, len(nums) + 1)), f"versions not contiguous: {nums}"
    assert all(r.ok for r in reg.verify(name)), reg.verify(name)
    registers = [e for e in reg.history(name) if e["event"] == "register"]
    assert sorted(e["version"] for e in registers) == nums
    return nums


def test_concurrent_registrations_lose_nothing(tmp_path):
    """Four writer processes (forked by one launcher that paid torch's import once) released together, three
    registrations each."""
    root = tmp_path / "reg"
    p = spawn(root, "--writers", "a,b,c,d", "-n", "3")
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    out, err = p.communicate("go\n", timeout=300)
    assert p.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert len({r["pid"] for r in results}) == 4, "each writer is a process of its own"
    got = [v for r in results for v in r["versions"]]
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
    """Four times, a writer process registering without end is SIGKILLed at a random moment (the launcher
    forks it, lets it register for 0.02-0.4 s, ~25 ms a registration, and kills it)."""
    root = tmp_path / "reg"
    p = spawn(root, "--kill-rounds", "4", "--seed", "1234")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    rounds = [json.loads(line) for line in out.splitlines()]
    assert [r["signal"] for r in rounds] == [signal.SIGKILL] * 4, "each writer was still registering when killed"
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


# ---- signed move records (kit.registry.moves) under real processes

MOVES_CHILD = Path(__file__).with_name("moves_child.py")


def _signed_model(tmp_path: Path) -> tuple[Registry, Path]:
    from kit_testing import three_versions

    from kit.signing import Keyring

    keys = tmp_path / "keys"
    reg = three_versions(Registry(tmp_path / "reg", user="t", keyring=Keyring(keys)), gated=(1, 2))
    return reg, keys


def _moves(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(MOVES_CHILD), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _assert_chain(reg: Registry) -> list[int]:
    """Every move record verifies and chains to the one before; aliases.json is a copy of one of them."""
    from kit.registry.moves import MoveStorage

    st = MoveStorage(reg.model_dir("m"))
    moves = [e for e in reg.history("m") if e.get("verified") is not None]
    assert all(e["verified"] for e in moves), [e for e in moves if not e["verified"]]
    serials = [e["serial"] for e in moves]
    assert serials == list(range(1, len(serials) + 1)), serials
    assert reg.aliases_path("m").read_bytes() in {st.read(s) for s in serials}, "aliases.json is no record's copy"
    return serials


def test_two_writers_racing_for_one_serial_exactly_one_wins(tmp_path):
    """Four writer processes, three rounds: each reads the same head, then all create the next record at once."""
    reg, keys = _signed_model(tmp_path)
    go = tmp_path / "go"
    procs = [_moves("race", str(reg.root), str(keys), str(go), "3") for _ in range(4)]
    for round_ in range(3):
        for p in procs:  # every child has read the head this round starts from
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        Path(f"{go}{round_}").touch()
        outs = [p.stdout.readline().split() for p in procs]
        assert sorted(o[0] for o in outs) == ["lost", "lost", "lost", "won"], outs
        assert len({o[1] for o in outs}) == 1  # all four wanted the same serial
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert _assert_chain(reg)[-1] == 4


def test_concurrent_movers_lose_no_move(tmp_path):
    reg, keys = _signed_model(tmp_path)
    procs = [_moves("moves", str(reg.root), str(keys), "5") for _ in range(3)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got += [int(x) for x in out.split()]
    assert sorted(got) == list(range(2, 17)), got  # serial 1 is the promote; 15 moves, 15 records
    assert _assert_chain(reg) == list(range(1, 17))


def test_a_move_killed_midway_leaves_no_unaudited_move(tmp_path):
    from kit.signing import Keyring

    reg, keys = _signed_model(tmp_path)
    rng = random.Random(17)
    for _ in range(4):
        p = _moves("loop", str(reg.root), str(keys))
        assert p.stdout.readline().strip().isdigit(), p.stderr.read()  # its first move is done: it loops
        time.sleep(rng.uniform(0.02, 0.4))  # a move takes ~5 ms: the kill lands inside one
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        serials = _assert_chain(Registry(reg.root, keyring=Keyring(keys)))
        svc = Registry(reg.root, keyring=Keyring.verify_only(Keyring(keys).trust()))
        assert svc.aliases("m").serial == serials[-1]  # a reader follows the newest record, even if aliases.json lags
    assert reg.set_canary("m", 2, 0.5, force=True, why="after kills").serial == serials[-1] + 1
