"""A child process for tests/integration/test_registry_processes.py's move tests (a real second writer).

    moves_child.py race ROOT KEYS GO R  R rounds: read the head, print "ready", wait for the file GO<round>,
                                        then create the next move record without the lock; print "won SERIAL"
                                        or "lost SERIAL"
    moves_child.py moves ROOT KEYS N    N canary re-weights through the registry (the lock); print each serial
    moves_child.py loop ROOT KEYS       canary re-weights until killed
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kit.registry import Registry
from kit.signing import Keyring


def race(reg: Registry, go: Path) -> None:
    ml = reg.movelog("m")
    head, cur = ml.base()
    signer = reg.keyring.signer()
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    try:
        ml.commit(head, "canary", cur, signer, user="racer", why="race", artifacts={}, relies_on={}, details={})
        print("won", head.serial + 1, flush=True)
    except Exception as exc:  # the loser is told, nothing is written
        print("lost", head.serial + 1, type(exc).__name__, flush=True)


def main() -> None:
    mode, root, keys = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    reg = Registry(root, user=f"child-{mode}", keyring=Keyring(keys, create=False))
    if mode == "race":
        for round_ in range(int(sys.argv[5])):
            race(reg, Path(f"{sys.argv[4]}{round_}"))
        return
    n = int(sys.argv[4]) if mode == "moves" else 10**9
    for i in range(n):
        a = reg.set_canary("m", 2, round(0.05 + (i % 9) / 10, 2), force=True, why=f"step {i}")
        print(a.serial, flush=True)


if __name__ == "__main__":
    main()
