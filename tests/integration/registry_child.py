"""Writer processes for the registry process tests (test_registry_processes.py, test_s3_registry.py).

Importing torch and a first ``torch.export`` cost about 3 CPU-s a process, and none of it is what these
tests race: so this process pays them once, captures every model its writers register, then forks the
writers. Each is a process of its own, with its own ``Registry``, lock and connections, racing the others
on the same registry as a separate program would.

    registry_child.py ROOT --writers NAMES [-n N] [--moves M] [--name NAME] [--unsigned]
        fork one writer per comma-separated name, all held at one barrier; print "ready", wait for a line on
        stdin (the go: the parent releases every launcher at once), then release them together. Each
        registers N versions (tags pid and i), then promotes its last one M times (a move another writer
        made first is repeated), and prints one JSON line: {"who", "pid", "versions", "serials"}. Exits 1 if
        any writer failed (its traceback on stderr).
    registry_child.py ROOT --kill-rounds K --seed S
        K times: fork a writer registering without end, SIGKILL it at a random moment of its registrations;
        print one JSON line per round: {"versions_before_kill", "signal"}.
    registry_child.py ROOT --pause-before-rename FILE
        one registration here, which writes FILE and sleeps just before the version folder is renamed into
        place (the parent kills the process there with SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from kit.capture import CapturedModel, capture
from kit.errors import PromotionRefusedError
from kit.registry import Registry


def tiny(seed: int) -> CapturedModel:
    torch.manual_seed(seed)
    return capture(torch.nn.Linear(4, 2), torch.randn(1, 4), onnx=False, progress=False)


def warm(model: CapturedModel) -> None:
    """A registration into a throwaway folder: what a process's first one imports and caches (torch's
    serializer, the lock, the fingerprint's list of distributions) is then done once here, not in every writer."""
    with tempfile.TemporaryDirectory() as d:
        Registry(d, keyring=None).register("warm", model, progress=False)


def fork(work: Callable[[], None], barrier: tuple[int, int] | None = None) -> int:
    """A child process that waits until ``barrier`` (a pipe) reaches EOF, runs ``work`` and exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if barrier is not None:
            os.close(barrier[1])
            os.read(barrier[0], 1)  # b"" once the launcher closes the last write end: all start at once
        work()
    except BaseException:  # noqa: BLE001 - the child reports and exits; the launcher counts it
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def say(obj: object) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())  # one write: lines from several writers never interleave


def open_registry(args: argparse.Namespace, who: str) -> Registry:
    if args.unsigned:  # two hosts, no shared key
        return Registry(args.root, require_gate=False, user=who, keyring=None)
    return Registry(args.root, user=who)


def writer(args: argparse.Namespace, who: str, models: list[CapturedModel]) -> None:
    reg = open_registry(args, who)
    versions = [reg.register(args.name, cm, tags={"pid": os.getpid(), "i": i}, progress=False).version
                for i, cm in enumerate(models)]
    serials: list[int] = []
    while len(serials) < args.moves:
        try:
            a = reg.promote(args.name, versions[-1], force=True, why=f"{who} move {len(serials)}")
            serials.append(a.serial)
        except PromotionRefusedError as exc:
            if exc.remedy != "refresh":
                raise
    say({"who": who, "pid": os.getpid(), "versions": versions, "serials": serials})


def race(args: argparse.Namespace) -> int:
    names = args.writers.split(",")
    models = {who: [tiny(zlib.crc32(f"{who}/{i}".encode())) for i in range(args.n)] for who in names}
    warm(models[names[0]][0])
    hold, release = os.pipe()
    pids = [fork(lambda who=who: writer(args, who, models[who]), (hold, release)) for who in names]
    os.close(hold)
    print("ready", flush=True)
    sys.stdin.readline()
    os.close(release)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        print(f"writers {failed} failed (their tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


def kill_rounds(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    pool = [tiny(i) for i in range(4)]
    warm(pool[0])

    def endless() -> None:
        reg = Registry(args.root, user=f"pid{os.getpid()}")
        for i in range(10**9):
            reg.register(args.name, pool[i % len(pool)], tags={"pid": os.getpid(), "i": i}, progress=False)

    reg = Registry(args.root)
    for _ in range(args.kill_rounds):
        before = len(reg.versions(args.name)) if (reg.root / args.name / "versions").is_dir() else 0
        pid = fork(endless)
        time.sleep(rng.uniform(0.02, 0.4))  # a registration takes ~25 ms: the kill lands inside one
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        say({"versions_before_kill": before, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None})
    return 0


def pause_before_rename(args: argparse.Namespace) -> int:
    real_rename = os.rename

    def slow_rename(src, dst):  # type: ignore[no-untyped-def]
        Path(args.pause_before_rename).write_text(str(src))
        time.sleep(60)
        real_rename(src, dst)

    model = tiny(os.getpid())
    os.rename = slow_rename  # type: ignore[assignment]
    Registry(args.root, user=f"pid{os.getpid()}").register(args.name, model, progress=False)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--name", default="m")
    p.add_argument("--writers", help="comma-separated writer names")
    p.add_argument("-n", type=int, default=1)
    p.add_argument("--moves", type=int, default=0)
    p.add_argument("--unsigned", action="store_true")
    p.add_argument("--kill-rounds", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pause-before-rename")
    args = p.parse_args()
    if args.pause_before_rename:
        return pause_before_rename(args)
    if args.kill_rounds:
        return kill_rounds(args)
    return race(args)


if __name__ == "__main__":
    sys.exit(main())
