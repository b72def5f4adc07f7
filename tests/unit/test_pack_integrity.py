"""run.sh's checks before any interpreter of the archive starts: every file (env/ included) against
kit-pack.sha256 with coreutils, symlinks against kit-pack.links, nothing unlisted, and the list's signature
with the system openssl against keys the operator gives (KIT_TRUST).

The archive here is small and real: a venv whose interpreter links to this one (so a .pth in it would run
at interpreter start), a service file, and the lists written by kit.pack.integrity, as ``pack()`` writes them.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kit._io import sha256_file
from kit.pack import integrity
from kit.pack.build import _render
from kit.signing import KeyStore

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum is not installed")

STEM = "demo-v1-linux-x86_64"


def _platform() -> str:
    return f"{platform.system().lower()}-{platform.machine()}"


def _archive(tmp_path: Path, signer=None) -> Path:
    root = tmp_path / STEM
    site = root / "env" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "kit" / "serving").mkdir(parents=True)
    (root / "env" / "bin").mkdir(parents=True)
    base = Path(sys.executable).resolve()
    (root / "env" / "bin" / "python").symlink_to(base)
    (root / "env" / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n")
    (site / "kit" / "serving" / "app.py").write_text("# the served app\n")
    (root / "service").mkdir()
    (root / "service" / "service.toml").write_text('[service]\nname = "demo"\n')
    (root / "kit-pack.json").write_text('{"format": "kit-pack", "signed_by": "%s"}\n' % (signer.key_id if signer else ""))
    ctx = dict(service="demo", label="v1", kit_version="0", kind="venv", created="now",
               python=platform.python_version(), platform=_platform(), base_interpreter=str(base),
               unit="kit-demo.service", bind="127.0.0.1:0")
    (root / "run.sh").write_text(_render("run.sh.j2", **ctx))
    (root / "run.sh").chmod(0o755)
    _relist(root, signer)
    return root


def _relist(root: Path, signer=None) -> None:
    """Write kit-pack.links / kit-pack.sha256 (/ .sig) for the folder as it is: what pack() writes, and
    what an attacker who edits an unsigned archive can also do."""
    files, links = {}, {}
    for p in sorted(root.rglob("*")):
        if p.name in (integrity.SUMS, integrity.SUMS_SIG, integrity.LINKS) and p.parent == root:
            continue
        a = f"{STEM}/{p.relative_to(root)}"
        if p.is_symlink():
            links[a] = os.readlink(p)
        elif p.is_file():
            files[a] = sha256_file(p)
    (root / integrity.LINKS).write_bytes(integrity.links_text(links, STEM))
    files[f"{STEM}/{integrity.LINKS}"] = sha256_file(root / integrity.LINKS)
    sums = integrity.sums_text(files, STEM)
    (root / integrity.SUMS).write_bytes(sums)
    if signer is not None:
        (root / integrity.SUMS_SIG).write_bytes(signer.sign(sums))


def _run(root: Path, *args: str, trust: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(root.parent)}
    if trust is not None:
        env["KIT_TRUST"] = str(trust)
    return subprocess.run([str(root / "run.sh"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_an_untouched_archive_passes_and_says_what_it_checked(tmp_path):
    root = _archive(tmp_path)
    out = _run(root, "unpack")
    assert out.returncode == 0, out.stderr
    assert "checked" in out.stderr and "nothing added" in out.stderr
    assert "signature was not checked (KIT_TRUST is unset)" in out.stderr
    assert (root / "env" / ".kit-unpacked").is_file()
    assert _run(root, "unpack").returncode == 0  # the marker run.sh wrote is expected


def test_an_edited_module_in_env_is_refused(tmp_path):
    root = _archive(tmp_path)
    app = next(root.rglob("kit/serving/app.py"))
    app.write_text("import os; os.system('touch pwned')\n")
    out = _run(root, "unpack")
    assert out.returncode == 1
    assert "kit/serving/app.py: sha256 differs" in out.stderr and "extract the archive again" in out.stderr


def test_an_added_pth_is_refused_before_any_interpreter_runs(tmp_path):
    root = _archive(tmp_path)
    marker = tmp_path / "pth-ran"
    site = next(root.rglob("site-packages"))
    (site / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    # the .pth is live: this very interpreter, started as the archive's, runs it
    subprocess.run([str(root / "env" / "bin" / "python"), "-c", "pass"], check=True)
    assert marker.exists()
    marker.unlink()
    out = _run(root, "verify")  # verify would start the archive's Python: it must not get there
    assert out.returncode == 1
    assert "were not packed" in out.stderr and "evil.pth" in out.stderr
    assert not marker.exists()
    # a __pycache__ file that was not packed is refused too
    (site / "evil.pth").unlink()
    (site / "__pycache__").mkdir()
    (site / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    out = _run(root, "unpack")
    assert out.returncode == 1 and "x.cpython-311.pyc" in out.stderr


def test_a_retargeted_symlink_and_a_missing_file_are_refused(tmp_path):
    root = _archive(tmp_path)
    py = root / "env" / "bin" / "python"
    py.unlink()
    py.symlink_to("/bin/sh")
    out = _run(root, "unpack")
    assert out.returncode == 1 and "env/bin/python: expected a symlink to" in out.stderr
    root = _archive(tmp_path / "b")
    (root / "service" / "service.toml").unlink()
    out = _run(root, "unpack")
    assert out.returncode == 1 and "service/service.toml" in out.stderr


def test_kit_trust_refuses_an_archive_whose_list_was_rewritten(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    key = KeyStore(tmp_path / "keys").new()
    root = _archive(tmp_path / "a", signer=key)
    trust = tmp_path / "trusted_keys"
    trust.write_text(f"# the packer's key\n{key.public.text()}\n")
    out = _run(root, "unpack", trust=trust)
    assert out.returncode == 0 and f"signed by a trusted key ({key.key_id}" in out.stderr, out.stderr
    pem = tmp_path / "trusted.pem"
    pem.write_text(KeyStore(tmp_path / "other").new().public.pem() + key.public.pem())
    assert _run(root, "unpack", trust=pem).returncode == 0

    # The attacker edits a file and rewrites the lists (without the key): the lists agree with the files,
    # so without KIT_TRUST the archive passes (docs/security.md says so); with it, it is refused.
    next(root.rglob("kit/serving/app.py")).write_text("# evil\n")
    _relist(root)
    assert _run(root, "unpack").returncode == 0
    out = _run(root, "unpack", trust=trust)
    assert out.returncode == 1
    assert f"not signed by any key in {trust} (the archive says key {key.key_id})" in out.stderr

    # signed by the attacker's own key: refused
    _relist(root, KeyStore(tmp_path / "attacker").new())
    assert _run(root, "unpack", trust=trust).returncode == 1
    # unsigned: refused under KIT_TRUST, with the fix
    (root / integrity.SUMS_SIG).unlink()
    out = _run(root, "unpack", trust=trust)
    assert out.returncode == 1 and "is not signed (no kit-pack.sha256.sig)" in out.stderr
    out = _run(root, "unpack", trust=tmp_path / "nope")
    assert out.returncode == 1 and "not a readable file" in out.stderr


def test_names_run_sh_cannot_list_are_refused_at_pack_time():
    from kit.errors import PackError

    with pytest.raises(PackError, match="newline, tab or backslash"):
        integrity.sums_text({f"{STEM}/a\nb": "0" * 64}, STEM)
    with pytest.raises(PackError, match="outside the archive folder"):
        integrity.sums_text({"elsewhere/a": "0" * 64}, STEM)


def test_the_server_side_check_verifies_model_signatures_against_the_packed_trust(tmp_path):
    """After run.sh's file check: `python -m kit.pack verify` checks each shipped version's signature
    against service/service.toml [trust] (what the service will do), so a list rewritten together with a
    re-hashed meta.json still fails where the trust is right."""
    import json

    import numpy as np
    import torch

    from kit._io import atomic_write_json
    from kit.errors import IntegrityError
    from kit.pack.runtime import check_models
    from kit.registry import Registry, artifact_digest
    from kit.signing import Keyring

    root = tmp_path / STEM
    reg = Registry(root / "registry", keyring=Keyring(tmp_path / "keys"))
    torch.manual_seed(0)
    mv = reg.register("m", torch.nn.Linear(4, 2), torch.randn(2, 4))
    (root / "service").mkdir()
    toml = root / "service" / "service.toml"
    head = '[service]\nname = "demo"\n[model]\nname = "m"\nregistry = "../registry"\n'  # read as the service reads it
    toml.write_text(head + f'[trust]\npublic_keys = ["{reg.keyring.signer().public.text()}"]\n')
    manifest = {"models": {"m": {"versions": [1]}}}
    assert check_models(root, manifest) == ("m@1",)
    with np.load(mv.path / "example.npz") as z:
        arrays = {k: z[k] * 2 for k in z.files}
    np.savez(mv.path / "example.npz", **arrays)
    meta = json.loads((mv.path / "meta.json").read_text())
    meta["files"]["example.npz"] = sha256_file(mv.path / "example.npz")
    meta["artifact_sha256"] = artifact_digest(meta["files"])
    atomic_write_json(mv.path / "meta.json", meta)
    with pytest.raises(IntegrityError, match="m@1 .*changed after it was signed"):
        check_models(root, manifest)
    toml.write_text(head + "[trust]\npublic_keys = []\n")  # an archive made for a service without trust: sha256 only
    assert check_models(root, manifest) == ("m@1",)


def test_a_renamed_long_entry_keeps_its_new_name(tmp_path):
    """conda-pack writes long names as PAX records; re-emitted under env/, they must land under env/ (they
    used to extract outside the archive folder, which run.sh's file check found: torch's long header paths)."""
    import io
    import tarfile

    from kit.pack._tar import TarMember

    src = io.BytesIO()
    long = "lib/python3.11/site-packages/torch/include/ATen/ops/" + "x" * 90 + ".h"
    with tarfile.open(fileobj=src, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(long)
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    src.seek(0)
    out = tmp_path / "a.tar.gz"
    with open(out, "wb") as f, tarfile.open(fileobj=src) as tf:
        member = TarMember(f)
        for ti in tf:
            ti.name = f"{STEM}/env/{ti.name}"
            member.add_member(ti, tf.extractfile(ti))
        member.close(end_of_archive=True)
    with tarfile.open(out) as tf:
        assert tf.getnames() == [f"{STEM}/env/{long}"]
    assert list(member.hashes) == [f"{STEM}/env/{long}"]
