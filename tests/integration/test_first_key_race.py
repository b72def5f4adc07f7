"""Parallel first runs sharing an empty key folder end with one signing key (issue 19).

Eight real processes, each configured through ``KIT_KEYS_DIR`` as a first-time user's would be, wait at a
start line (a file) and then ask their keyring for its signer at once: every one must sign with the same
key, and the folder must hold one key pair. Before key creation was atomic each process kept its own key.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from kit.signing import KeyStore

WORKERS = 8
CHILD = """
import os, sys, time
from pathlib import Path
from kit.config import load_config

go = Path(sys.argv[1])
ring = load_config(cwd=Path(sys.argv[2])).keyring()
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
key = ring.signer()
print(key.key_id, int(ring.created is not None), flush=True)
"""


def test_parallel_first_runs_share_one_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    go = tmp_path / "go"
    env = {**os.environ, "KIT_KEYS_DIR": str(keys)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(go), str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(WORKERS)]
    for p in procs:  # every child has imported kit and built its keyring before the start
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr and p.stderr.read()
    time.sleep(0.2)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        key_id, made = out.split()
        results.append((key_id, made == "1"))

    ids = {key_id for key_id, _ in results}
    assert len(ids) == 1, f"{len(ids)} different signing keys made by {WORKERS} first runs: {sorted(ids)}"
    assert sum(made for _, made in results) == 1, results  # exactly one process says it made the key
    (key_id,) = ids
    assert sorted(p.name for p in keys.iterdir()) == sorted(["default", f"{key_id}.pem", f"{key_id}.pub"])
    store = KeyStore(keys)
    assert store.default_id() == key_id and store.key_ids() == [key_id]
    assert stat.S_IMODE(os.stat(keys / f"{key_id}.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    key = store.default()
    assert key is not None and key.public.verify(key.sign(b"x"), b"x")


def test_new_key_becomes_default_only_where_none_is(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    first = store.new(make_default=False)  # an empty folder: the first key is its default
    assert store.default_id() == first.key_id
    second = store.new(make_default=False)
    assert store.default_id() == first.key_id and store.key_ids() == sorted([first.key_id, second.key_id])
    (store.root / "default").write_text("")  # emptied by hand: the next key claims it, as before
    third, made = store.first()
    assert made and store.default_id() == third.key_id
    assert store.first() == (third, False)
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
