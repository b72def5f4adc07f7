"""Issue 17, classes 3 and 4 against a real gunicorn service (2 workers) trusting only the project key:
the registry's files of a served version truncated, corrupted and deleted under it (issue 20's SIGBUS
when weights were mapped from the registry), and a writer flipping a version's meta.json and model.pt2
between the signed files and their own in a loop while the service loads it. The service maps its own
verified cache (kit.registry.cache), so it keeps answering with the signed weights, and never the attacker's.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from kit_testing import get_json, wait_all_workers
from torch import nn

from kit._io import sha256_file
from kit.capture import capture
from kit.errors import IntegrityError, SignatureError
from kit.registry import Registry, artifact_digest
from kit.servicegen import generate, start_service
from kit.signing import Keyring

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "stored"
X = [[0.5, -1.0, 2.0, 0.25]]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3))


def _want(seed: int) -> np.ndarray:
    with torch.inference_mode():
        return _model(seed)(torch.tensor(X)).numpy()


def _predict(url: str) -> tuple[int, np.ndarray | None, str | None]:
    req = urllib.request.Request(url + "/predict", data=json.dumps({"inputs": X}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, np.asarray(json.loads(r.read())["outputs"], dtype=np.float32), \
                r.headers.get("X-Kit-Model-Version")
    except urllib.error.HTTPError as exc:
        return exc.code, None, None
    except OSError:
        return 0, None, None


@pytest.fixture
def served(tmp_path):
    reg = Registry(tmp_path / "registry", user="owner", keyring=Keyring(tmp_path / "keys"))
    reg.register(MODEL, _model(0), torch.randn(2, 4))
    reg.promote(MODEL, 1, force=True, why="test")
    d = generate("storage", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=2, poll_interval=0.2,
                 trusted_keys=reg.keyring.service_keys())
    with start_service(d, timeout=90) as running:
        wait_all_workers(running.url, lambda b: (b.get("production") or {}).get("version") == 1)
        yield reg, running


def test_a_served_version_keeps_answering_when_its_registry_files_are_truncated_or_deleted(served):
    reg, running = served
    want = _want(0)
    workers = set(_children(running))
    v1 = reg.version_dir(MODEL, 1)
    with open(v1 / "model.pt2", "r+b") as f:  # in place, as a writer (or a bad copy) on the share would
        f.truncate(100)
    (v1 / "example.npz").write_bytes(b"\0" * 10)
    for i in range(60):
        code, out, version = _predict(running.url)
        assert code == 200 and version == "1", (i, code, running.logs()[-2000:])
        assert np.allclose(out, want, atol=1e-5)
    shutil.rmtree(v1)  # the version vanishes from the registry altogether
    for _ in range(20):
        code, out, _ = _predict(running.url)
        assert code == 200 and np.allclose(out, want, atol=1e-5)
    assert set(_children(running)) == workers, "a worker died (SIGBUS?) and was replaced"
    assert "SIGBUS" not in running.logs() and "Worker (pid" not in running.logs()


def _children(running) -> list[int]:
    """The gunicorn master's worker pids (from /proc: pids whose parent is the master)."""
    master = running.pid
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                out.append(int(p))
    return sorted(out)


def test_a_writer_flipping_a_version_in_a_loop_never_gets_its_weights_served(served, tmp_path):
    reg, running = served
    good_mv = reg.register(MODEL, _model(2), torch.randn(2, 4))
    evil = tmp_path / "evil"
    files = capture(_model(3), torch.randn(2, 4)).save(evil)
    meta = json.loads((good_mv.path / "meta.json").read_bytes())
    meta["files"] = {p.name: sha256_file(p) for p in files}  # re-hashed for their weights; no key to sign
    meta["artifact_sha256"] = artifact_digest(meta["files"])
    (evil / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    good = tmp_path / "good"
    shutil.copytree(good_mv.path, good)
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            for n in ("meta.json", "model.pt2"):
                tmp = good_mv.path / f".swap-{n}"
                shutil.copyfile((evil if i % 2 == 0 else good) / n, tmp)
                os.replace(tmp, good_mv.path / n)
            i += 1

    t = threading.Thread(target=flip, daemon=True)
    t.start()
    answers = {"1": 0, "2": 0}
    try:
        for _ in range(50):  # the promoter's own check may catch the swap too (refused, rightly): try again
            try:
                reg.promote(MODEL, 2, force=True, why="a signed version, under attack while it loads")
                break
            except (SignatureError, IntegrityError):
                time.sleep(0.01)
        else:
            raise AssertionError("the signed version was never promotable between the attacker's swaps")
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            code, out, version = _predict(running.url)
            assert code == 200, running.logs()[-2000:]
            assert version in answers
            assert np.allclose(out, _want(0 if version == "1" else 2), atol=1e-5), (version, out)
            assert not np.allclose(out, _want(3), atol=1e-5)
            answers[version] += 1
            if answers["2"] >= 40:
                break
    finally:
        stop.set()
        t.join(5)
    _, body = get_json(running.url + "/readyz")
    print(f"answers by version: {answers}; reloads: {body.get('reloads')}")
    assert answers["2"] > 0 or body.get("reload_error"), (answers, body)
    if answers["2"]:
        assert body["production"]["signed_by"] == reg.keyring.signer().key_id
