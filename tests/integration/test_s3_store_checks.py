"""A store that does not honour ``PUT If-None-Match: *`` is refused before anything is claimed in it, and
``kit registry check`` says what a bucket and the credentials allow, with the fix for each failure.

Such stores exist (releases of S3-compatible servers before conditional writes; gateways that drop the
header) and cannot be installed here, so each is played by a small HTTP proxy in front of the real S3 server
(the ``s3_server`` fixture: SeaweedFS, or moto under ``make test-s3-compat``) that forwards every request
unchanged and changes one answer: "ignore" turns the server's 412 to a conditional create into a 200 (what a
client of a store that overwrote the object would see), "501" answers a conditional create with 501
NotImplemented (a store that knows it lacks the feature), "deny-staging" refuses every request under
``_uploads/`` with 403 (a writer whose IAM allows only moves, as a service's canary guard's does). The same
proxy passing everything through shows the proxy alone breaks nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from click.testing import CliRunner

from kit.cli import cli
from kit.errors import ConfigError
from kit.registry import Registry
from kit.registry.s3 import S3Storage

pytestmark = pytest.mark.timeout(120)
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _proxy(upstream: str, mode: str) -> ThreadingHTTPServer:
    up = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conditional = self.command == "PUT" and self.headers.get("If-None-Match") == "*"
            if mode == "deny-staging" and "/_uploads/" in self.path:
                return self._answer(403, {}, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message>"
                                              b"</Error>")
            if conditional and mode == "501":
                return self._answer(501, {}, b"<Error><Code>NotImplemented</Code><Message>A header you provided "
                                              b"implies functionality that is not implemented</Message></Error>")
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():  # Host too: the client signed it
                conn.putheader(k, v)
            conn.endheaders(body or None)
            res = conn.getresponse()
            status, headers, data = res.status, {k: v for k, v in res.getheaders()}, res.read()
            conn.close()
            if conditional and mode == "ignore" and status == 412:
                status, headers, data = 200, {"ETag": '"0123456789abcdef0123456789abcdef"'}, b""
            self._answer(status, headers, data)

        def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def via(s3_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``via(mode)`` -> an ``s3://`` URL whose requests go through a proxy of that mode."""
    servers: list[ThreadingHTTPServer] = []

    def make(mode: str) -> str:
        srv = _proxy(s3_env["AWS_ENDPOINT_URL"], mode)
        servers.append(srv)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.server_address[1]}")
        return f"s3://kit-test/cond-{mode}-{uuid.uuid4().hex[:8]}"

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _register(url: str, tmp_path) -> int:
    torch.manual_seed(0)
    reg = Registry(url, keyring=None, cache_dir=tmp_path / "cache")
    return reg.register("tiny", torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(1, 4),), onnx=False).version


def test_a_proxy_passing_everything_through_changes_nothing(via, tmp_path):
    assert _register(via("pass"), tmp_path) == 1


@pytest.mark.parametrize("mode, said", [("ignore", "a second create of one new object succeeded"),
                                        ("501", "NotImplemented")])
def test_a_store_without_conditional_creates_is_refused_before_a_claim(via, tmp_path, mode, said):
    url = via(mode)
    with pytest.raises(ConfigError, match=f"does not honour conditional creates.*{said}") as e:
        _register(url, tmp_path)
    assert "\n" not in str(e.value) and "folder registry" in str(e.value)
    left = S3Storage.from_url(url).list_keys("")
    assert not [k for k in left if "/claims/" in k or k.endswith("meta.json")], left  # nothing claimed or made visible
    assert not [k for k in left if "conditional-create-probe" in k], left  # the probe object was deleted


def test_a_writer_not_allowed_the_probe_prefix_writes_unchecked_and_says_so(via, tmp_path, caplog):
    assert _register(via("deny-staging"), tmp_path) == 1
    assert "conditional creates were not checked here" in caplog.text


def _check(url: str, *args: str) -> tuple[int, dict[str, tuple[str, str]], dict]:
    res = CliRunner().invoke(cli, ["--registry", url, "registry", "check", "--write", "--json", *args])
    out = json.loads(res.stdout)
    return res.exit_code, {c["check"]: (c["status"], c["fix"]) for c in out["checks"]}, out


def test_registry_check_of_a_bucket_a_writer_can_use(url_with_a_version):
    code, checks, out = _check(url_with_a_version)
    assert code == 0 and out["ok"], out
    assert out["checks"][1]["detail"] == "1 model(s): tiny"
    assert {k: v[0] for k, v in checks.items()} == {
        "settings": "ok", "list": "ok", "read": "ok", "conditional GET": "ok", "write": "ok",
        "conditional create": "ok", "delete staging": "ok", "resumable uploads": "ok"}
    assert "static key from AWS_ACCESS_KEY_ID" in out["checks"][0]["detail"]
    assert not [k for k in S3Storage.from_url(url_with_a_version).list_keys("") if "registry-check" in k]


@pytest.fixture
def url_with_a_version(s3_env, tmp_path) -> str:
    url = f"s3://kit-test/check-{uuid.uuid4().hex[:8]}"
    assert _register(url, tmp_path) == 1
    return url


@pytest.mark.parametrize("mode, failed, fix", [
    ("ignore", "conditional create", "answers 412 to PUT If-None-Match: *"),
    ("501", "conditional create", "answers 412 to PUT If-None-Match: *"),
    ("deny-staging", "write", "A writer needs s3:PutObject on arn:aws:s3:::kit-test/cond-deny-staging-")])
def test_registry_check_names_what_a_store_lacks(via, mode, failed, fix):
    code, checks, out = _check(via(mode))
    assert code == 1 and not out["ok"]
    assert checks[failed][0] == "fail" and fix in checks[failed][1], checks
    assert [k for k, (st, _) in checks.items() if st == "fail"] == [failed]


def test_registry_check_with_a_wrong_secret_fails_at_the_list(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    code, checks, _ = _check("s3://kit-test/anything")
    assert code == 1 and checks["list"][0] == "fail" and "s3:ListBucket on arn:aws:s3:::kit-test" in checks["list"][1]
    assert "read" not in checks and "write" not in checks  # nothing past what failed first


@pytest.fixture
def s3fs_mount(s3_env, tmp_path) -> Iterator[Path]:
    """The test bucket mounted with s3fs-fuse (Debian's s3fs, installed by `make fleet-deps`): a folder that is
    an object store underneath, as a team that mounts its bucket would give Kit."""
    if shutil.which("s3fs") is None or not os.access("/dev/fuse", os.W_OK):
        pytest.skip("no s3fs-fuse or no /dev/fuse here (make fleet-deps installs Debian's s3fs)")
    mnt, creds = tmp_path / "mnt", tmp_path / "s3fs.pass"
    mnt.mkdir()
    creds.write_text(f"{s3_env['AWS_ACCESS_KEY_ID']}:{s3_env['AWS_SECRET_ACCESS_KEY']}\n")
    creds.chmod(0o600)
    subprocess.run(["s3fs", "kit-test", str(mnt), "-o", f"passwd_file={creds}", "-o", f"url={s3_env['AWS_ENDPOINT_URL']}",
                    "-o", "use_path_request_style"], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_a_folder_registry_on_a_mounted_bucket_is_refused_for_writes(s3fs_mount, tmp_path):
    reg_dir = s3fs_mount / f"reg-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match=r"is on fuse\.s3fs at .*an object store mounted with FUSE.*s3://bucket"):
        _register(str(reg_dir), tmp_path)
    assert not (reg_dir / "tiny" / "versions").exists()  # refused before a version was numbered
    res = CliRunner().invoke(cli, ["--registry", str(reg_dir), "registry", "check", "--write", "--json"])
    checks = {c["check"]: c for c in json.loads(res.stdout)["checks"]}
    assert res.exit_code == 1 and checks["filesystem"]["status"] == "fail" and "fuse.s3fs" in checks["filesystem"]["detail"]


def test_keys_that_are_not_plain_paths_are_skipped_never_fatal_or_printed(url_with_a_version, tmp_path):
    """A bucket writer's keys with a control character or an empty part, written with another client (obstore
    refuses to). Listed raw (moto, as AWS), they would stop obstore's whole listing; Kit lists URL-encoded
    and skips them: the check, the models, the versions and the next claim go on as if they were absent."""
    import boto3

    bucket, prefix = url_with_a_version[5:].split("/", 1)
    s3 = boto3.client("s3")
    for bad in ("\x1b[2Jevil/versions/1/meta.json", "tiny/versions/\x1b1/meta.json", "tiny/versions/2\x1b/meta.json",
                "tiny/claims/\x07.json"):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{bad}", Body=b"{}")
    res = CliRunner().invoke(cli, ["--registry", url_with_a_version, "registry", "check"])
    assert res.exit_code == 0 and "\x1b" not in res.stdout, res.stdout
    assert "1 model(s): tiny" in next(ln for ln in res.stdout.splitlines() if ln.startswith("list "))
    reg = Registry(url_with_a_version, keyring=None, cache_dir=tmp_path / "cache-2")
    assert reg.models() == ["tiny"] and [v.version for v in reg.versions("tiny")] == [1]
    torch.manual_seed(1)
    assert reg.register("tiny", torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(1, 4),),
                        onnx=False).version == 2


def test_a_listing_follows_continuation_tokens(url_with_a_version, tmp_path, monkeypatch):
    """Pages of 2 keys (S3 gives 1000): every key and folder comes back once, through the tokens."""
    import kit.registry.s3list as s3list

    st = S3Storage.from_url(url_with_a_version)
    for i in range(5):
        st.put(f"tiny/events/e{i}.json", b"{}")
        st.put(f"m{i}/versions/1/x", b"1")
    whole = (st.list_keys(""), st.folders(""), st.sizes("tiny/events"))
    monkeypatch.setattr(s3list, "_PAGE_KEYS", 2)
    tokens, call = [], st.rest.call
    monkeypatch.setattr(st.rest, "call", lambda m, k, q, *a: tokens.append(q.get("continuation-token")) or call(m, k, q, *a))
    assert (st.list_keys(""), st.folders(""), st.sizes("tiny/events")) == whole
    assert sum(t is not None for t in tokens) >= 8  # the store paged: 13 keys and 7 folders in pages of 2
    assert [f for f in whole[1] if f[0] != "_"] == ["m0", "m1", "m2", "m3", "m4", "tiny"] and len(whole[2]) == 6  # and the register event
