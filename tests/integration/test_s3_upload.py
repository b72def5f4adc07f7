"""Resumable uploads to a real S3 server (the ``s3_server`` fixture: SeaweedFS, or moto's model of AWS S3 under
``make test-s3-compat``): a big file's parts are staged as objects of their own and joined server-side
(kit.registry.s3parts), so an upload killed half-way and run again sends only the missing parts, and a reader
never sees a partial object.

Parts are 5 MiB here, the smallest S3 (SeaweedFS, moto) joins, so each file is a few parts.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from kit.errors import StorageError
from kit.registry import Registry
from kit.registry.s3 import S3Storage

pytestmark = pytest.mark.timeout(300)

PART = 5 << 20


@pytest.fixture
def url(s3_env) -> str:
    return f"s3://kit-test/up-{uuid.uuid4().hex[:10]}"


def _file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _storage(url: str, endpoint: str | None = None) -> S3Storage:
    env = dict(os.environ, **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {}))
    st = S3Storage.from_url(url, env)
    st.part_size, st.max_concurrency = PART, 1
    return st


class CountingProxy:
    """A TCP relay in front of the S3 server that counts the bytes clients send through it (the wire's count,
    not the client's own)."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.sent, self.lock = 0, threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                if count:
                    with self.lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()  # each socket is one relay's source: closed once, by it

    def close(self) -> None:
        self.sock.close()


KILLED_UPLOAD = """
import os, signal, sys
from pathlib import Path
from kit.registry.s3 import S3Storage

st = S3Storage.from_url(sys.argv[1])
st.part_size, st.max_concurrency = int(sys.argv[4]), 1

def progress(done, total):
    if done >= 2 * st.part_size:  # two parts stored: killed as a power cut or the OOM killer would
        os.kill(os.getpid(), signal.SIGKILL)

st.upload(sys.argv[2], Path(sys.argv[3]), progress, sha256=sys.argv[5])
"""


def test_a_killed_upload_resumes_sending_only_the_missing_parts(url: str, s3_server, tmp_path: Path):
    src = tmp_path / "model.bin"
    size = 4 * PART + 12345
    sha = _file(src, size)
    key = "big/versions/1/model.bin"
    run = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, url, key, str(src), str(PART), sha],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    reader = _storage(url)
    assert reader.get(key, size) is None  # killed: no object, not a partial one
    staged = reader.list_keys("_uploads/")
    assert len(staged) == 2 and all(k.startswith(f"_uploads/{sha}/{PART}/") for k in staged), staged

    seen: list[int] = []  # what a reader polling the key sees while the upload resumes: nothing, or all of it
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            got = reader.get(key, size)
            if got is not None:
                assert hashlib.sha256(got.data).hexdigest() == sha
                seen.append(len(got.data))

    poller = threading.Thread(target=poll, daemon=True)
    proxy = CountingProxy(s3_server.endpoint)
    poller.start()
    try:
        writer = _storage(url, proxy.endpoint)
        said: list[tuple[int, int]] = []
        writer.upload(key, src, lambda done, total: said.append((done, total)), sha256=sha)
    finally:
        stop.set()
        poller.join(30)
        proxy.close()
    missing = size - 2 * PART
    assert writer.sent_bytes == missing
    assert missing <= proxy.sent < size - PART, (proxy.sent, size)  # the wire carried the missing parts only
    assert said[0] == (2 * PART, size) and said[-1] == (size, size)  # progress starts at what was staged
    assert [d for d, _ in said] == sorted(d for d, _ in said)
    got = reader.get(key, size)
    assert got is not None and hashlib.sha256(got.data).hexdigest() == sha
    assert set(seen) <= {size}
    assert reader.list_keys("big/") == [key] and reader.list_keys("_uploads/") == []  # staging deleted


def test_an_upload_failing_after_some_parts_resumes_and_stale_staging_is_swept(url: str, tmp_path: Path):
    st = _storage(url)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    sha_a, sha_b = _file(a, 3 * PART + 1), _file(b, 2 * PART + 7)

    def fail_after_one_part(done: int, total: int) -> None:
        if done >= PART:
            raise ConnectionResetError("the network went away")

    with pytest.raises(StorageError, match="could not upload m/versions/1/a.bin"):
        st.upload("m/versions/1/a.bin", a, fail_after_one_part, sha256=sha_a)
    assert st.sent_bytes == PART and st.list_keys("m/versions/") == []
    assert len(st.list_keys(f"_uploads/{sha_a}/")) == 1

    st.stale_staging = timedelta(0)  # every staged folder counts as abandoned: the next upload sweeps a's
    st.upload("m/versions/2/b.bin", b, sha256=sha_b)
    assert st.list_keys("") == ["m/versions/2/b.bin"]
    got = st.get("m/versions/2/b.bin", 1 << 30)
    assert got is not None and hashlib.sha256(got.data).hexdigest() == sha_b


def test_two_writers_of_the_same_file_at_once_both_finish_whole(url: str, tmp_path: Path):
    src = tmp_path / "same.bin"
    sha = _file(src, 3 * PART + 99)
    errors: list[BaseException] = []

    def upload(key: str) -> None:
        try:
            st = _storage(url)
            st.max_concurrency = 2
            st.upload(key, src, sha256=sha)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(f"m/versions/{n}/same.bin",)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    reader = _storage(url)
    for n in (1, 2):
        got = reader.get(f"m/versions/{n}/same.bin", 1 << 30)
        assert got is not None and hashlib.sha256(got.data).hexdigest() == sha
    assert reader.list_keys("_uploads/") == []


KILLED_REGISTER = """
import os, signal, sys, torch
from kit.registry import Registry
from kit.signing import Keyring

reg = Registry(sys.argv[1], keyring=Keyring(sys.argv[2]), cache_dir=sys.argv[3])
reg.storage.part_size = int(sys.argv[4])

def progress(line):
    if "model.pt2" in line and line.endswith("(100%)"):  # every part staged, not yet joined
        os.kill(os.getpid(), signal.SIGKILL)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1200, 1200)).eval()
reg.register("wide", model, (torch.randn(1, 1200),), onnx=False, progress=progress)
"""


def _wide() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1200, 1200)).eval(), (torch.randn(1, 1200),)


def test_a_register_killed_mid_upload_resumes_on_the_next_register(url: str, keyring, tmp_path: Path):
    run = subprocess.run([sys.executable, "-c", KILLED_REGISTER, url, str(keyring.store.root), str(tmp_path / "c1"),
                          str(PART)], capture_output=True, text=True, timeout=240)
    assert run.returncode == -9, run.stderr
    reg = Registry(url, keyring=keyring, cache_dir=tmp_path / "c2")
    assert "wide/versions/1/model.pt2" not in reg.storage.list_keys("wide/versions/")  # killed before its join
    assert not any(k.endswith("meta.json") for k in reg.storage.list_keys("wide/versions/"))
    assert reg.storage.list_keys("_uploads/") and reg.models() == ["wide"]  # staging is no model

    reg.storage.part_size = PART
    lines: list[str] = []
    mv = reg.register("wide", *_wide(), onnx=False, progress=lines.append)
    assert mv.version == 2  # number 1 was claimed by the killed writer: a gap, never reused
    pt2 = reg.storage.get("wide/versions/2/model.pt2", 1 << 30)
    assert pt2 is not None and len(pt2.data) > PART
    assert reg.storage.sent_bytes < len(pt2.data)  # model.pt2's parts were all staged: only the small files went
    meters = [ln for ln in lines if ln.startswith("  … upload: wide/versions/2/model.pt2 ")]
    assert meters and meters[-1].endswith(f"of {len(pt2.data) / 1e6:.1f} MB (100%)"), lines
    assert reg.storage.list_keys("_uploads/") == []
    assert reg.verify("wide")[0].ok
    lm = Registry(url, keyring=keyring, cache_dir=tmp_path / "c3").load("wide", 2)
    model, example = _wide()
    torch.testing.assert_close(lm.module(*example), model(*example))
