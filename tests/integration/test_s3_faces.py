"""Every face of Kit on a registry in a bucket (a real S3 server, the ``s3_server`` fixture: SeaweedFS, or moto's
model of AWS S3 under ``make test-s3-compat``).

Each `kit` command that reads or writes a registry runs through click in-process with ``KIT_REGISTRY=s3://...``
(or ``--registry``); %deploy and %registry run in a real IPython shell, the gate in a real papermill kernel,
and `kit pack` stages a bucket's production version (downloaded and verified through the local cache) into
the folder registry an archive carries. A "host" is a cache folder (``KIT_CACHE_DIR``: the verified cache and
this machine's mirror of the bucket's small objects), so what one host writes another reads from the bucket.

Before the fixes these tests came with, a bucket refused `kit keys sign` and `kit pack`, `kit aliases repair`
of a garbage aliases.json crashed (it removed this host's copy, not the object), a guard key registered by
`kit service new` stayed on the host that made it (a canary started elsewhere delegated to no one), a full
cache disk failed a download half-way with a raw OSError, and `kit show` and the panel named the mirror.
"""

from __future__ import annotations

import json
import os
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from fs_faults import small_tmpfs
from kit_testing import project_keyring
from torch import nn

from kit.cli import cli
from kit.errors import StorageError
from kit.registry import Registry
from kit.signing import Keyring

pytestmark = pytest.mark.timeout(300)

GATE = ["-p", "latency_repeats=5", "-p", "max_latency_ratio=50", "-p", "batch_n=8"]  # about the bucket, not speed


@pytest.fixture
def url(s3_env) -> str:
    return f"s3://kit-test/faces-{uuid.uuid4().hex[:10]}"


def _tiny(seed: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3)).eval(), (torch.randn(2, 4),)


class Host:
    """One machine: its own cache folder (and so its own mirror of the bucket), the session's signing key."""

    def __init__(self, tmp: Path, name: str, url: str):
        self.url, self.cache = url, tmp / f"host-{name}"
        self.env = {"KIT_REGISTRY": url, "KIT_CACHE_DIR": str(self.cache)}

    def kit(self, *args: str, code: int = 0, env: dict[str, str | None] | None = None) -> Result:
        res = CliRunner().invoke(cli, list(args), env={**self.env, **(env or {})})
        if res.exit_code != code:
            tb = "".join(traceback.format_exception(res.exception)) if res.exception else ""
            pytest.fail(f"kit {' '.join(args)} exited {res.exit_code}, not {code}:\n{res.output[-3000:]}\n{tb[-3000:]}")
        return res

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self.kit(*args, "--json", code=code).stdout)

    def registry(self, **kwargs: Any) -> Registry:
        kwargs.setdefault("keyring", project_keyring())
        return Registry(self.url, cache_dir=self.cache, **kwargs)

    def register(self, name: str, seed: int, **kwargs: Any) -> int:
        reg = self.registry(user=kwargs.pop("user", "alice"), **kwargs)
        return reg.register(name, *_tiny(seed), onnx=False, progress=False).version


def test_the_registry_commands_on_a_bucket(url: str, tmp_path: Path):
    a, b, c = (Host(tmp_path, n, url) for n in "abc")
    assert [a.register("tiny", 0), a.register("tiny", 1), a.register("tiny", 2, keyring=None)] == [1, 2, 3]
    key_id = project_keyring().signer().key_id

    assert b.json("models") == [{"name": "tiny", "versions": 3, "latest": 3, "production": None, "canary": None,
                                 "canary_weight": 0.0}]
    assert f"({url})" in b.kit("models", "tiny").output
    assert f"path:       {url}/tiny/versions/1\n" in b.kit("show", "tiny@1").output  # the bucket, not a mirror
    assert b.json("show", "tiny@2")["version"] == 2

    out = b.kit("verify", code=1).output  # v3 was registered without a key
    assert "ok  tiny@1" in out and "BAD tiny@3" in out and "not signed" in out
    assert b.json("keys", "sign", "tiny@3")["key_id"] == key_id  # before: refused on a bucket
    assert [(r["ok"], r["signed_by"]) for r in c.json("verify")] == [(True, key_id)] * 3  # the upload, read elsewhere

    assert a.json("promote", "tiny@1", "--force", "--why", "first")["serial"] == 1
    canary = b.json("canary", "tiny@2", "--weight", "10%", "--force", "--why", "try")  # b reads a's move
    assert (canary["aliases"]["production"]["version"], canary["aliases"]["canary"]["version"]) == (1, 2)
    back = a.json("rollback", "tiny", "--why", "back")
    assert back["only_ended_canary"] is True and back["aliases"].get("canary") is None
    assert "repaired tiny: production=1" in c.kit("aliases", "repair", "tiny").output
    events = c.json("history", "tiny")
    assert [e["event"] for e in events if e["event"] != "register"] == ["sign", "promote", "canary", "rollback",
                                                                        "aliases_repair"]
    moves = [e for e in events if e["event"] in ("promote", "canary", "rollback")]
    assert [e["serial"] for e in moves] == [1, 2, 3] and all(e["verified"] and e["signed_by"] == key_id for e in moves)
    assert "No drift" in c.kit("env", "--diff", "tiny@1").output

    listed = c.json("cache")
    assert Path(listed["cache"]).is_relative_to(c.cache) and len(listed["entries"]) == 3  # verify cached all three
    removed = c.json("cache", "prune", "--unused-for", "0s")["removed"]
    prod = c.registry().get("tiny", 1).artifact_sha256
    assert len(removed) == 2 and not any(r.startswith(prod) for r in removed)  # production's entry is kept


def test_sizes_and_paths_of_versions_a_host_never_downloaded(url: str, tmp_path: Path):
    """`kit models NAME` takes each version's size from its record (meta.json's file_sizes; for a version
    registered before sizes were recorded, from one listing of its folder), not from this host's mirror, which
    holds no files; `kit show --json` and `kit models NAME --json` name the bucket, not the mirror."""
    a, b = Host(tmp_path, "a", url), Host(tmp_path, "b", url)
    a.register("tiny", 0)
    a.register("tiny", 1)
    st = a.registry().storage
    stored = st.sizes("tiny/versions/1/")
    meta = json.loads(st.get("tiny/versions/1/meta.json", 1 << 20).data)
    want = sum(stored[f"tiny/versions/1/{f}"] for f in meta["files"])
    assert meta["file_sizes"] == {f: stored[f"tiny/versions/1/{f}"] for f in meta["files"]} and want > 1024
    del meta["file_sizes"]  # as an older Kit wrote it (a listing reads it unverified; a load checks the signature)
    st.put("tiny/versions/2/meta.json", json.dumps({**meta, "version": 2}).encode())

    listed = b.json("models", "tiny")
    assert [v["size_bytes"] for v in listed] == [want, want]  # b downloaded nothing
    assert [v["path"] for v in listed] == [f"{url}/tiny/versions/1", f"{url}/tiny/versions/2"]
    rows = [ln for ln in b.kit("models", "tiny").output.splitlines() if ln.lstrip().startswith(("1 ", "2 "))]
    assert len(rows) == 2 and all(f" {want / 1024:.0f} KiB " in r for r in rows), rows
    shown = b.json("show", "tiny@1")
    assert shown["path"] == f"{url}/tiny/versions/1" and shown["size_bytes"] == want
    assert not any((b.cache / ".remote").rglob("*.pt2"))  # sizes came without a download


def test_aliases_migrate_and_repair_write_the_bucket(url: str, tmp_path: Path):
    a, b = Host(tmp_path, "a", url), Host(tmp_path, "b", url)
    a.register("tiny", 0)
    a.register("other", 1)
    st = a.registry().storage
    st.put("tiny/aliases.json", json.dumps({"serial": 3, "production": {"version": 1, "previous": []}}).encode())
    migrated = a.json("aliases", "migrate", "tiny", "--yes")
    assert (migrated["serial"], migrated["signed_by"]) == (4, project_keyring().signer().key_id)
    assert b.registry().aliases("tiny").production == 1  # the signed record is in the bucket

    st.put("other/aliases.json", b"garbage{")  # never moved, and unreadable
    assert "repaired other: production=-" in b.kit("aliases", "repair", "other").output
    assert st.get("other/aliases.json", 1 << 20) is None  # before: a traceback, and the object stayed
    assert a.json("models", "other")[0]["aliases"] == ""


def test_a_service_of_a_bucket_registry_its_guard_key_fleet_files_and_check(url: str, tmp_path: Path):
    from kit.guard_key import load_or_create_guard_key
    from kit.traffic import guard_stop

    a, b, c = (Host(tmp_path, n, url) for n in "abc")
    a.register("tiny", 0)
    a.register("tiny", 1)
    a.kit("promote", "tiny@1", "--force", "--why", "first")
    services = tmp_path / "services"
    made = a.json("--registry", url, "service", "new", "tinysvc", "--model", "tiny", "--out-dir", str(services))
    svc = Path(made["path"])
    assert f'registry = "{url}"' in (svc / "service.toml").read_text()

    b.kit("canary", "tiny@2", "--weight", "10%", "--force", "--why", "try")  # another host starts the canary
    assert list(b.registry().aliases("tiny").guards) == [made["guard_key"]]  # ... delegating to the service's key
    # the service's guard (a verify-only registry and its guard key, on a host of its own) ends that canary
    served = c.registry(keyring=Keyring.verify_only(project_keyring().trust()))
    ended = guard_stop(served, "tiny", 2, served.aliases("tiny").serial, {"detail": "worse"},
                       signer=load_or_create_guard_key(svc))
    assert ended is not None and a.registry().aliases("tiny").canary is None
    last = a.json("history", "tiny")[-1]
    assert (last["event"], last["by_guard"], last["verified"], last["signed_by"]) == (
        "canary_guard", True, True, made["guard_key"]), last

    nginx = tmp_path / "fleet" / "nginx.conf"
    a.kit("fleet", "nginx", str(svc), "--upstream", "127.0.0.1:8001", "--listen", "127.0.0.1:8080", "-o", str(nginx))
    a.kit("fleet", "prometheus", str(svc), "--target", "127.0.0.1:8001", "-o", str(tmp_path / "fleet"))
    assert "127.0.0.1:8001" in nginx.read_text() and (tmp_path / "fleet" / "prometheus.yml").is_file()
    # gunicorn --check-config in a subprocess: it loads production from the bucket on a third host
    assert "check-config ok" in c.kit("service", "check", str(svc), env={"KIT_REGISTRY": None}).output
    assert list((c.cache / "services" / "tinysvc").glob("[0-9a-f]*"))


def test_validate_promote_and_replay_on_a_bucket(url: str, tmp_path: Path):
    from kit.serving.recorder import CaptureSettings, Recorder

    a, b, c = (Host(tmp_path, n, url) for n in "abc")
    a.register("tiny", 0)
    a.register("tiny", 0)  # v2: v1's twin
    a.kit("promote", "tiny@1", "--force", "--why", "first")
    refused = a.kit("promote", "tiny@2", code=2).output
    assert "no passing gate" in refused

    gate = b.json("validate", "tiny@2", *GATE)  # a real kernel on host b; its evidence goes to the bucket
    assert gate["passed"] is True and Path(gate["report_path"]).is_relative_to(b.cache)
    assert a.json("promote", "tiny@2")["version"] == 2  # host a counts host b's signed, passing gate

    loaded = c.registry().load("tiny", 1)  # what production served, captured as a service would
    rec = Recorder(CaptureSettings(enabled=True, sample_rate=1.0), "tiny", tmp_path / "capture")
    gen = torch.Generator().manual_seed(1)
    for i in range(12):
        x = torch.randn(1 + i % 3, 4, generator=gen)
        rec.record(f"r{i}", 1, 200, 0.001, loaded.signature, (x,), (loaded(x),))
    rec.close()
    report = c.json("replay", "tiny@2", "--capture", str(tmp_path / "capture"))
    assert (report["replayed"], report["agreement"], report["errors"]) == (12, 1.0, 0)


def test_deploy_magic_and_the_panel_on_a_bucket(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from IPython.core.interactiveshell import InteractiveShell

    from kit.config import load_config
    from kit.magics import KitMagics
    from kit.widgets import RegistryPanel

    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "host-notebook"))
    cfg = load_config(cwd=tmp_path, registry=url, user="tester", gate_timeout=120.0)
    assert cfg.registry == url
    ip = InteractiveShell.instance()
    ip.register_magics(KitMagics(ip, config=cfg))
    model, example = _tiny(0)
    ip.user_ns.update(model=model, x=example[0])
    params = " ".join(GATE)
    try:
        for line in (f"%deploy model --example x --name tiny --promote --service tinysvc --no-onnx {params}",
                     f"%deploy model --example x --name tiny --canary 10% --no-onnx {params}"):
            res = ip.run_cell(line, store_history=False)
            assert res.error_in_exec is None and res.error_before_exec is None, line
            assert res.result.gate.passed and res.result.version.path.is_relative_to(tmp_path / "host-notebook")
    finally:
        for var in ("model", "x"):
            ip.user_ns.pop(var, None)
    reader = Host(tmp_path, "reader", url).registry()
    a = reader.aliases("tiny")
    assert (a.production, a.canary, a.canary_weight) == (1, 2, 0.1)
    assert f'registry = "{url}"' in (tmp_path / "services" / "tinysvc" / "service.toml").read_text()

    panel = RegistryPanel.from_config("tiny", cfg)
    assert url in panel.header.value and "production v1" in panel.header.value
    panel.version.value = 2
    panel.report_button.click()  # the gate's report, as synced from the bucket
    assert "gate passed" in panel.status.value, panel.status.value
    panel.stop_button.click()
    assert "kit-error" not in panel.status.value, panel.status.value
    assert reader.aliases("tiny").canary is None  # the panel's move is in the bucket


def test_pack_stages_a_bucket_version_through_the_verified_cache(url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """What ``kit pack`` ships of a bucket registry: the staged folder registry and the shipped set (a whole
    pack writes a ~550 MB environment layer, ~70 s cold: tests/e2e/test_pack_venv.py packs and serves one
    from a folder; staging and the selection are the steps that differ for a bucket)."""
    from kit.pack import envscan
    from kit.pack.select import select
    from kit.pack.stage import plan_models, read_service, stage_models

    a = Host(tmp_path, "a", url)
    a.register("tiny", 0)
    a.kit("promote", "tiny@1", "--force", "--why", "first")
    svc_dir = Path(a.json("service", "new", "tinysvc", "--model", "tiny", "--out-dir", str(tmp_path / "svc"))["path"])

    # the command reads the bucket (service.toml's URL, no KIT_REGISTRY) and goes on to the environment's checks
    out = a.kit("pack", str(svc_dir), "--platform", "nowhere-x", "--out", str(tmp_path / "dist"), code=2,
                env={"KIT_REGISTRY": None}).output
    assert "[platform]" in out and "object store" not in out

    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "host-packer"))  # a packer's host, with a cold cache
    svc = read_service(svc_dir)
    assert svc.registry == url
    plan = plan_models(svc, svc.registry, project_keyring())
    stage_models(plan, tmp_path / "stage" / "registry")
    [entry] = plan.registry.cache.entries()  # downloaded once, verified, in the packer's cache
    staged = tmp_path / "stage" / "registry" / "tiny"
    assert os.path.samefile(plan.mvs[0].path / "model.pt2", entry / "model.pt2")
    assert sorted(p.name for p in (staged / "moves").iterdir()) == ["00000001.json"]
    assert (staged / "events.jsonl").read_text().count('"register"') == 1
    shipped = Registry(staged.parent, keyring=Keyring.verify_only(project_keyring().trust()),
                       cache_dir=tmp_path / "server-cache")  # the archive's registry, as a server opens it
    assert shipped.aliases("tiny").production == 1 and [r.ok for r in shipped.verify("tiny")] == [True]
    model, example = _tiny(0)
    torch.testing.assert_close(shipped.load("tiny", "production").module(*example), model(*example))
    # the archive's service.toml names the bucket (KIT_RUN_REGISTRY=s3://... follows it): the client ships too
    scan = envscan.scan(envscan.running_prefix())
    assert "obstore" in select(scan, "torch", extras=("s3",)).shipped and "obstore" in select(scan, "torch").left_out


def test_a_full_cache_disk_refuses_a_download_whole(url: str, tmp_path: Path):
    writer = Host(tmp_path, "writer", url).registry()
    torch.manual_seed(0)
    writer.register("big", nn.Sequential(nn.Linear(512, 1024)).eval(), torch.randn(2, 512), onnx=False,
                    progress=False)  # 2 MiB of weights
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        reader = Registry(url, keyring=project_keyring(), cache_dir=disk / "cache")
        with pytest.raises(StorageError, match=r"Cannot write s3://.*/big/versions/1/model\.pt2 \(a download\)") as e:
            reader.load("big", 1)
        assert "free" in str(e.value) and str(disk / "cache") in str(e.value)
        assert not [p for p in (disk / "cache").iterdir() if p.name.startswith(".tmp-") or p.name[:1].isalnum()]
