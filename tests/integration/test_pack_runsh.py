"""run.sh against an archive carrier (issue 17, class 7), with real bash, coreutils, openssl and tar.

Before any interpreter of the archive starts, run.sh checks every file (env/ included) against
kit-pack.sha256, symlinks against kit-pack.links, that nothing is there that was not packed as it is (an
unlisted file, a FIFO, a socket), and the list's signature against keys the operator gives (KIT_TRUST). For
a conda archive it trusts its record of the relocated environment only when that record's MAC under a
host-local key verifies, so a record that came with the archive never is. Before extracting, the ship steps
``kit pack`` prints check the archive's own signature and sha256.

The archive here is small and real: a venv (or a conda-kind folder) whose interpreter links to this one (so a
.pth in it would run at interpreter start), a service file, the lists written by kit.pack.integrity, and,
for the ship steps, a .tar.gz written by the writers ``pack()`` uses. What cannot exist here: conda-unpack
itself (conda-pack generates it into a conda prefix; tests/e2e/test_pack_conda.py runs the real one), so
the conda-kind folder carries a stand-in script that rewrites a prefix in a file and leaves a trace.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kit._io import sha256_file
from kit.pack import integrity
from kit.pack._tar import SUFFIX, TarMember
from kit.pack.build import _render
from kit.signing import KeyStore, SigningKey

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None or shutil.which("openssl") is None,
                                reason="coreutils sha256sum and openssl are needed (every supported server has them)")

STEM = "demo-v1-linux-x86_64"
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"  # conda's build-time prefix, rewritten by conda-unpack
CONDA_UNPACK = f'''import pathlib, sys
env = pathlib.Path(sys.argv[0]).resolve().parents[1]
data = env / "lib" / "sysconfigdata.py"
data.write_text(data.read_text().replace({PLACEHOLDER!r}, str(env)))
'''


def _platform() -> str:
    return f"{platform.system().lower()}-{platform.machine()}"


def make_archive(tmp_path: Path, signer: SigningKey | None = None, kind: str = "venv") -> Path:
    """An unpacked archive folder, as tar leaves it: env/, service/, run.sh, kit-pack.json and the lists."""
    root = tmp_path / STEM
    site = root / "env" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "kit" / "serving").mkdir(parents=True)
    (root / "env" / "bin").mkdir(parents=True)
    base = Path(sys.executable).resolve()
    (root / "env" / "bin" / "python").symlink_to(base)
    if kind == "venv":
        (root / "env" / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n")
    else:
        (root / "env" / "bin" / "conda-unpack").write_text(CONDA_UNPACK)
        (root / "env" / "lib" / "sysconfigdata.py").write_text(f"PREFIX = {PLACEHOLDER!r}\n")
    (site / "kit" / "serving" / "app.py").write_text("# the served app\n")
    (root / "service").mkdir()
    (root / "service" / "service.toml").write_text('[service]\nname = "demo"\n')
    (root / "kit-pack.json").write_text('{"format": "kit-pack", "signed_by": "%s"}\n' % (signer.key_id if signer else ""))
    ctx = dict(service="demo", label="v1", kit_version="0", kind=kind, created="now",
               python=platform.python_version(), platform=_platform(), base_interpreter=str(base),
               unit="kit-demo.service", bind="127.0.0.1:0", app="app:app")
    (root / "run.sh").write_text(_render("run.sh.j2", **ctx))
    (root / "run.sh").chmod(0o755)
    relist(root, signer)
    return root


def relist(root: Path, signer: SigningKey | None = None) -> None:
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


def run_sh(root: Path, *args: str, trust: Path | None = None, state: Path | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(root.parent)}
    if trust is not None:
        env["KIT_TRUST"] = str(trust)
    if state is not None:
        env["KIT_STATE_DIR"] = str(state)
    return subprocess.run([str(root / "run.sh"), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def packer(tmp_path: Path) -> tuple[SigningKey, Path]:
    """The packer's key and the operator's KIT_TRUST file holding its public key (outside the archive)."""
    key = KeyStore(tmp_path / "keys").new()
    trust = tmp_path / "trusted_keys"
    trust.write_text(f"# the packer's key\n{key.public.text()}\n")
    return key, trust


# --------------------------------------------------------------------------- the file check


def test_an_untouched_archive_passes_and_says_what_it_checked(tmp_path):
    root = make_archive(tmp_path)
    out = run_sh(root, "unpack")
    assert out.returncode == 0, out.stderr
    assert "checked" in out.stderr and "nothing added" in out.stderr
    assert "signature was not checked (KIT_TRUST is unset)" in out.stderr
    assert not (root / "env" / ".kit-unpacked").exists()  # a venv is never relocated: run.sh records nothing
    assert run_sh(root, "unpack").returncode == 0


def test_an_edited_module_in_env_is_refused(tmp_path):
    root = make_archive(tmp_path)
    app = next(root.rglob("kit/serving/app.py"))
    app.write_text("import os; os.system('touch pwned')\n")
    out = run_sh(root, "unpack")
    assert out.returncode == 1
    assert "kit/serving/app.py: sha256 differs" in out.stderr and "extract the archive again" in out.stderr


def test_an_added_pth_is_refused_before_any_interpreter_runs(tmp_path):
    root = make_archive(tmp_path)
    marker = tmp_path / "pth-ran"
    site = next(root.rglob("site-packages"))
    (site / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    # the .pth is live: this very interpreter, started as the archive's, runs it
    subprocess.run([str(root / "env" / "bin" / "python"), "-c", "pass"], check=True)
    assert marker.exists()
    marker.unlink()
    out = run_sh(root, "verify")  # verify would start the archive's Python: it must not get there
    assert out.returncode == 1
    assert "were not packed" in out.stderr and "evil.pth (a file)" in out.stderr
    assert not marker.exists()
    # a __pycache__ file that was not packed is refused too
    (site / "evil.pth").unlink()
    (site / "__pycache__").mkdir()
    (site / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    out = run_sh(root, "unpack")
    assert out.returncode == 1 and "x.cpython-311.pyc" in out.stderr


def test_a_checked_tree_is_sealed_and_later_starts_check_the_seal_not_every_file(tmp_path, packer):
    """After a full check run.sh seals the tree (a MAC, under this user's key, of every path's type, inode,
    size, ctime and mode); a later start whose tree still matches skips re-hashing. Any change (an edited
    file, one touched, one added, a planted or copied seal) leads back to the full check."""
    key, trust = packer
    root = make_archive(tmp_path / "srv", signer=key)
    state = tmp_path / "state"
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 0 and "nothing added" in out.stderr, out.stderr
    seal = root / ".kit-sealed"
    assert seal.is_file() and len(seal.read_text().strip()) == 64

    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 0, out.stderr
    assert "sealed tree unchanged" in out.stderr and "nothing added" not in out.stderr
    assert "signed by a trusted key" in out.stderr  # the signature is checked on every start
    # `verify` hashes every file whatever the seal says
    assert "nothing added" in run_sh(root, "verify", trust=trust, state=state).stderr

    app = next(root.rglob("kit/serving/app.py"))
    original = app.read_bytes()
    app.write_bytes(b"import os  # edited after the seal\n")
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 1 and "tree changed since it was sealed" in out.stderr
    assert "kit/serving/app.py: sha256 differs" in out.stderr, out.stderr
    app.write_bytes(original)  # same bytes, new ctime: the full check passes and seals again
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 0 and "tree changed" in out.stderr and "nothing added" in out.stderr, out.stderr
    assert "sealed tree unchanged" in run_sh(root, "unpack", trust=trust, state=state).stderr

    (app.parent / "extra.py").write_text("x = 1\n")  # an added file
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 1 and "extra.py (a file)" in out.stderr, out.stderr
    (app.parent / "extra.py").unlink()

    # a seal is only as good as its key: another user's state (or a planted seal) is not trusted
    assert run_sh(root, "unpack", trust=trust, state=state).returncode == 0
    out = run_sh(root, "unpack", trust=trust, state=tmp_path / "other-state")
    assert out.returncode == 0 and "sealed tree unchanged" not in out.stderr and "nothing added" in out.stderr
    seal.write_text("0" * 64 + "\n")
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 0 and "tree changed since it was sealed" in out.stderr and "nothing added" in out.stderr


def test_fifos_and_sockets_are_refused_naming_the_path(tmp_path):
    """An unlisted FIFO used to pass the "nothing added" check (it looked for files and links only); a FIFO
    where a file was packed made sha256sum block for ever. Both are refused before sha256sum opens anything."""
    root = make_archive(tmp_path)
    fifo = root / "env" / "lib" / "queue"
    os.mkfifo(fifo)
    out = run_sh(root, "unpack", timeout=30)
    assert out.returncode == 1, out.stderr
    assert "env/lib/queue (a FIFO)" in out.stderr and "were not packed as they are" in out.stderr
    assert out.stderr.count("\n") == 2  # the note about KIT_TRUST, then one line: what, where, what to do
    fifo.unlink()

    app = next(root.rglob("kit/serving/app.py"))  # a packed file replaced by a FIFO: refused, not a hang
    app.unlink()
    os.mkfifo(app)
    out = run_sh(root, "unpack", timeout=30)
    assert out.returncode == 1 and f"{app.relative_to(root)} (a FIFO)" in out.stderr, out.stderr
    app.unlink()
    app.write_text("# the served app\n")
    assert run_sh(root, "unpack").returncode == 0

    sock_path = root / "service" / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        out = run_sh(root, "unpack")
    assert out.returncode == 1 and "service/s (a socket)" in out.stderr, out.stderr
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_a_retargeted_symlink_and_a_missing_file_are_refused(tmp_path):
    root = make_archive(tmp_path)
    py = root / "env" / "bin" / "python"
    py.unlink()
    py.symlink_to("/bin/sh")
    out = run_sh(root, "unpack")
    assert out.returncode == 1 and "env/bin/python: expected a symlink to" in out.stderr
    root = make_archive(tmp_path / "b")
    (root / "service" / "service.toml").unlink()
    out = run_sh(root, "unpack")
    assert out.returncode == 1 and "service/service.toml" in out.stderr


def test_kit_trust_refuses_an_archive_whose_list_was_rewritten(tmp_path, packer):
    key, trust = packer
    root = make_archive(tmp_path / "a", signer=key)
    out = run_sh(root, "unpack", trust=trust)
    assert out.returncode == 0 and f"signed by a trusted key ({key.key_id}" in out.stderr, out.stderr
    pem = tmp_path / "trusted.pem"
    pem.write_text(KeyStore(tmp_path / "other").new().public.pem() + key.public.pem())
    assert run_sh(root, "unpack", trust=pem).returncode == 0

    # The attacker edits a file and rewrites the lists (without the key): the lists agree with the files,
    # so without KIT_TRUST the archive passes (docs/security.md says so); with it, it is refused.
    next(root.rglob("kit/serving/app.py")).write_text("# evil\n")
    relist(root)
    assert run_sh(root, "unpack").returncode == 0
    out = run_sh(root, "unpack", trust=trust)
    assert out.returncode == 1
    assert f"not signed by any key in {trust} (the archive says key {key.key_id})" in out.stderr

    # signed by the attacker's own key: refused
    relist(root, KeyStore(tmp_path / "attacker").new())
    assert run_sh(root, "unpack", trust=trust).returncode == 1
    # unsigned: refused under KIT_TRUST, with the fix
    (root / integrity.SUMS_SIG).unlink()
    out = run_sh(root, "unpack", trust=trust)
    assert out.returncode == 1 and "is not signed (no kit-pack.sha256.sig)" in out.stderr
    out = run_sh(root, "unpack", trust=tmp_path / "nope")
    assert out.returncode == 1 and "not a readable file" in out.stderr


# --------------------------------------------------------------------------- conda: the record after conda-unpack


def test_conda_first_start_checks_the_signed_list_relocates_once_and_binds_its_record(tmp_path, packer):
    key, trust = packer
    root = make_archive(tmp_path / "srv", signer=key, kind="conda")
    state = tmp_path / "state"
    data = root / "env" / "lib" / "sysconfigdata.py"
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 0, out.stderr
    assert "signed by a trusted key" in out.stderr and "conda-unpack" in out.stderr
    assert str(root / "env") in data.read_text()  # relocated
    k = state / "run-sh.key"
    assert stat.S_IMODE(k.stat().st_mode) == 0o600 and len(k.read_text().strip()) == 64
    record = root / "env" / ".kit-unpacked.sha256"
    assert "  env/lib/sysconfigdata.py" in record.read_text()

    # A later start checks env/ against the record (the packed hash of the relocated file no longer holds).
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 0 and "conda-unpack" not in out.stderr, out.stderr

    # A relocated file edited since: refused. Re-hashed into the record too (no key): refused.
    original = data.read_bytes()
    data.write_bytes(original + b"import os\n")
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 1 and "env/lib/sysconfigdata.py: sha256 differs" in out.stderr, out.stderr
    text = record.read_text()
    (line,) = [ln for ln in text.splitlines() if ln.endswith("  env/lib/sysconfigdata.py")]
    record.write_text(text.replace(line, f"{sha256_file(data)}  env/lib/sysconfigdata.py"))
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 1 and "was not written by this run.sh on this host" in out.stderr, out.stderr
    record.write_text(text)
    data.write_bytes(original)
    assert run_sh(root, "unpack", trust=trust, state=state).returncode == 0

    # Another user's (or a wiped) state: the record cannot be checked, so it is refused, with the fix.
    out = run_sh(root, "unpack", trust=trust, state=tmp_path / "other-state")
    assert out.returncode == 1 and "run-sh.key is missing" in out.stderr and "Extract the archive again" in out.stderr
    k.chmod(0o644)
    out = run_sh(root, "unpack", trust=trust, state=state)
    assert out.returncode == 1 and "mode 0600" in out.stderr
    k.chmod(0o600)

    # Moved after relocating: refused (conda-unpack relocates once).
    moved = tmp_path / "moved"
    root.rename(moved)
    out = run_sh(moved, "unpack", trust=trust, state=state)
    assert out.returncode == 1 and "has since moved" in out.stderr


@pytest.mark.parametrize("planted", ["list only", "list and marker", "with a host key present"])
def test_a_record_shipped_in_the_archive_is_refused_and_conda_unpack_never_runs(tmp_path, packer, planted):
    """The attack on the landed code: ship env/.kit-unpacked.sha256 listing an edited conda-unpack (and the
    marker), so run.sh checked env/ against the carrier's hashes and ran the edited script with KIT_TRUST set."""
    key, trust = packer
    state = tmp_path / "state"
    if planted == "with a host key present":  # this host has run an archive before: its key exists
        other = make_archive(tmp_path / "earlier", signer=key, kind="conda")
        assert run_sh(other, "unpack", trust=trust, state=state).returncode == 0
    root = make_archive(tmp_path / "srv", signer=key, kind="conda")
    pwned = tmp_path / "pwned"
    unpack = root / "env" / "bin" / "conda-unpack"
    unpack.write_text(f"import pathlib; pathlib.Path({str(pwned)!r}).touch()\n" + CONDA_UNPACK)
    env_lines = [ln for ln in (root / integrity.SUMS).read_text().splitlines() if ln[66:70] == "env/"]
    forged = [f"{sha256_file(unpack)}  env/bin/conda-unpack" if ln.endswith("  env/bin/conda-unpack") else ln
              for ln in env_lines]
    (root / "env" / ".kit-unpacked.sha256").write_text("\n".join(forged) + "\n")
    if planted != "list only":  # the carrier guesses the folder; it cannot know this host's key
        (root / "env" / ".kit-unpacked").write_text(f"{'0' * 64}\n{root / 'env'}\n")
    out = run_sh(root, "start", trust=trust, state=state)
    assert out.returncode == 1, out.stderr
    assert not pwned.exists(), "the edited conda-unpack ran"
    assert "conda-unpack" not in out.stderr.split("error:")[0]  # refused before relocating
    if planted == "list only":
        assert "env/.kit-unpacked.sha256 (a file)" in out.stderr and "were not packed" in out.stderr
    elif planted == "list and marker":
        assert "run-sh.key is missing" in out.stderr  # no key on this host yet: no record can be genuine
    else:
        assert "was not written by this run.sh on this host" in out.stderr


def test_a_venv_archive_holding_a_record_is_refused(tmp_path):
    root = make_archive(tmp_path)
    (root / "env" / ".kit-unpacked").write_text(f"{root / 'env'}\n")
    out = run_sh(root, "unpack")
    assert out.returncode == 1 and "env/.kit-unpacked (a file)" in out.stderr


# --------------------------------------------------------------------------- the ship steps, before extracting


def tar_up(root: Path, out_dir: Path, signer: SigningKey, codec: str = "gzip") -> Path:
    """The folder as a .tar.gz (.tar.zst) with its lists, signature, <archive>.sha256 and .sig, written by
    the code pack() writes them with: env/ as a first member, the rest as a second one."""
    archive = out_dir / f"{STEM}{SUFFIX[codec]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [p for p in sorted(root.rglob("*"))
             if not (p.parent == root and p.name in (integrity.SUMS, integrity.SUMS_SIG, integrity.LINKS))]
    with open(archive, "wb") as f:
        env = TarMember(f, codec=codec)
        for p in paths:
            if p.is_relative_to(root / "env"):
                env.add_path(p, f"{STEM}/{p.relative_to(root)}")
        env.close(end_of_archive=False)
        member = TarMember(f, codec=codec)
        for p in paths:
            if not p.is_relative_to(root / "env"):
                member.add_path(p, f"{STEM}/{p.relative_to(root)}")
        integrity.add_to_archive(member, STEM, env.hashes, env.links, signer)
        member.close(end_of_archive=True)
    integrity.sign_archive(archive, signer)
    return archive


def ship(archive: Path, server: Path, pem: Path, key_id: str) -> subprocess.CompletedProcess[str]:
    """Copy the archive and the two files beside it to ``server`` and run there exactly the commands
    ``kit pack`` prints, the packer's PEM key at ``pem`` instead of /etc/kit/packer.pem."""
    server.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".sha256", ".sha256.sig"):
        shutil.copy2(str(archive) + suffix, server)
    text = integrity.ship_text(archive, STEM, key_id)
    commands = text.split("Then, on the server:\n", 1)[1].replace(integrity.SERVER_TRUST, str(pem))
    env = {"PATH": os.environ["PATH"], "HOME": str(server)}
    return subprocess.run(["bash", "-c", commands], cwd=server, capture_output=True, text=True, env=env, timeout=60)


def test_the_printed_ship_steps_refuse_a_changed_archive_before_extracting_it(tmp_path, packer):
    key, _trust = packer
    pem = tmp_path / "packer.pem"
    pem.write_text(key.public.pem())
    archive = tar_up(make_archive(tmp_path / "build", signer=key), tmp_path / "dist", key)
    text = integrity.ship_text(archive, STEM, key.key_id)
    assert f"kit keys show {key.key_id} --pem" in text and integrity.SERVER_TRUST in text

    # The untouched archive: verified, extracted, and run.sh checks its files against the same key (then stops
    # at the archive's Python, which this small archive does not make a service of).
    out = ship(archive, tmp_path / "good", pem, key.key_id)
    assert "Signature Verified Successfully" in out.stdout and f"{archive.name}: OK" in out.stdout, out
    assert f"signed by a trusted key ({key.key_id}" in out.stderr and "nothing added" in out.stderr, out.stderr

    # The carrier replaces run.sh with one that skips every check, and fixes the lists and <archive>.sha256.
    # The carrier replaces run.sh with one that skips every check, and writes the lists, <archive>.sha256 and
    # its signature again, with a key of its own.
    attacker = KeyStore(tmp_path / "attacker").new()
    root = make_archive(tmp_path / "evil", signer=attacker)
    ran = tmp_path / "evil-ran"
    (root / "run.sh").write_text(f"#!/bin/sh\ntouch {ran}\n")
    forged = tar_up(root, tmp_path / "evil" / "dist", attacker)
    out = ship(forged, tmp_path / "server-a", pem, key.key_id)
    assert out.returncode != 0 and "Signature Verification Failure" in out.stdout + out.stderr, out
    assert not (tmp_path / "server-a" / STEM).exists() and not ran.exists(), "extracted or ran before the check"
    # ... or keeps the genuine .sha256 and .sig beside the changed archive: sha256sum refuses it.
    for suffix in (".sha256", ".sha256.sig"):
        shutil.copy2(str(archive) + suffix, str(forged) + suffix)
    out = ship(forged, tmp_path / "server-b", pem, key.key_id)
    assert out.returncode != 0 and "Signature Verified Successfully" in out.stdout and "FAILED" in out.stdout, out
    assert not (tmp_path / "server-b" / STEM).exists() and not ran.exists(), "extracted or ran before the check"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd binary packs and unpacks .tar.zst")
def test_a_zstd_archive_ships_with_its_own_tar_step_and_extracts_whole(tmp_path, packer):
    """--compress zstd: two zstd frames end to end are one stream; the printed steps unpack it with
    tar --zstd, and kit pack --verify's extract reads it from the open file it checked."""
    from kit.pack.verify import extract

    key, _trust = packer
    pem = tmp_path / "packer.pem"
    pem.write_text(key.public.pem())
    archive = tar_up(make_archive(tmp_path / "build", signer=key), tmp_path / "dist", key, codec="zstd")
    assert archive.name.endswith(".tar.zst") and archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert f"tar --zstd -xf {archive.name}" in integrity.ship_text(archive, STEM, key.key_id)
    out = ship(archive, tmp_path / "server", pem, key.key_id)
    assert f"{archive.name}: OK" in out.stdout and "nothing added" in out.stderr, out
    with open(archive, "rb") as f:
        root = extract(archive, tmp_path / "x", fileobj=f)
    assert (root / "env" / "pyvenv.cfg").is_file() and (root / "run.sh").is_file()
    assert run_sh(root, "unpack").returncode == 0


def test_kit_pack_prints_no_ship_steps_for_an_unsigned_archive():
    text = integrity.ship_text(Path("dist") / f"{STEM}.tar.gz", STEM, None)
    assert "not signed" in text and "openssl" not in text


def test_kit_pack_verify_checks_the_archive_signature_before_extracting(tmp_path, packer):
    """`kit pack --verify` (verify_archive) from a trusted install: the same check as the ship steps, in
    Python, on the open file that is then extracted."""
    from kit.errors import PackError, SignatureError
    from kit.pack.verify import extract
    from kit.signing import Trust

    key, _trust = packer
    archive = tar_up(make_archive(tmp_path / "build", signer=key), tmp_path / "dist", key)
    trust = Trust.from_texts([key.public.text()])
    with open(archive, "rb") as f:
        assert integrity.check_archive(archive, f, trust) == key.key_id
        f.seek(0)
        root = extract(archive, tmp_path / "out", fileobj=f)
    assert (root / "run.sh").is_file() and root.name == STEM

    other = Trust.from_texts([KeyStore(tmp_path / "other").new().public.text()])
    with open(archive, "rb") as f, pytest.raises(SignatureError, match="not signed by a trusted key"):
        integrity.check_archive(archive, f, other)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 1
    archive.write_bytes(bytes(data))
    with open(archive, "rb") as f, pytest.raises(PackError, match="changed after packing. Do not extract it"):
        integrity.check_archive(archive, f, trust)
    Path(str(archive) + ".sha256.sig").unlink()
    with open(archive, "rb") as f, pytest.raises(SignatureError, match="cannot be checked before extracting"):
        integrity.check_archive(archive, f, trust)
