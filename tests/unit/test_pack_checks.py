"""The checks before packing, on small synthetic prefixes (no processes: run.sh under bash -n and the
unit under systemd-analyze are tests/integration/test_system_tools.py). Negative fixtures: an editable
install, a clobbered file, a missing conda-meta/history, foreign wheels and conda packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kit.errors import IntegrityError, PackError
from kit.pack import envscan
from kit.pack.build import read_service
from kit.pack.runtime import check_files

SITE = "lib/python3.11/site-packages"
INFO = {"python": "3.11.7", "abi": "cp311", "platform": "linux-x86_64", "prefix": "/p", "purelib": f"/p/{SITE}",
        "fingerprint": {"python": "3.11.7"}}


def dist(prefix: Path, name: str, version: str = "1.0", *, files: list[str] = (), editable: str | None = None,
         tag: str = "py3-none-any", installer: str = "pip") -> None:
    site = prefix / SITE
    meta = site / f"{name}-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nbody\n")
    (meta / "INSTALLER").write_text(installer + "\n")
    (meta / "WHEEL").write_text(f"Wheel-Version: 1.0\nTag: {tag}\n")
    record = [f"{f},sha256=x,1" for f in files] + [f"{meta.name}/RECORD,,"]
    (meta / "RECORD").write_text("\n".join(record) + "\n")
    if editable:
        (meta / "direct_url.json").write_text(json.dumps({"dir_info": {"editable": True}, "url": f"file://{editable}"}))


def conda_pkg(prefix: Path, name: str, files: dict[str, bytes], subdir: str = "linux-64") -> None:
    meta = prefix / "conda-meta"
    meta.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (prefix / rel).parent.mkdir(parents=True, exist_ok=True)
        (prefix / rel).write_bytes(data)
    rec = {"name": name, "version": "1.0", "build": "0", "subdir": subdir, "files": sorted(files),
           "link": {"source": str(prefix / "no-pkgs-cache" / name), "type": 1}, "url": f"file:///{name}.tar.bz2",
           "paths_data": {"paths_version": 1, "paths": [
               {"_path": rel, "path_type": "hardlink", "size_in_bytes": len(d)} for rel, d in files.items()]}}
    (meta / f"{name}-1.0-0.json").write_text(json.dumps(rec))


@pytest.fixture
def conda_prefix(tmp_path: Path) -> Path:
    p = tmp_path / "env"
    conda_pkg(p, "python", {"bin/python3.11": b"\x7fELF fake", f"{SITE}/README.txt": b"site"})
    conda_pkg(p, "flask", {f"{SITE}/flask/__init__.py": b"# flask\n",
                           f"{SITE}/flask-3.0.dist-info/RECORD": b"flask/__init__.py,,\n"})
    (p / "conda-meta" / "history").write_text("")
    (p / "bin" / "python").symlink_to("python3.11")
    return p


def scan(p: Path) -> envscan.EnvScan:
    return envscan.scan(p, info=INFO)


def test_detects_conda_and_venv_and_refuses_neither(tmp_path, conda_prefix):
    assert scan(conda_prefix).kind == "conda"
    venv = tmp_path / "venv"
    (venv / SITE).mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /opt/py/bin\nexecutable = /opt/py/bin/python3.11\nversion = 3.11.7\n")
    s = scan(venv)
    assert s.kind == "venv" and s.base_interpreter == "/opt/py/bin/python3.11"
    with pytest.raises(PackError, match="neither a conda environment.*nor a venv"):
        envscan.detect_kind(tmp_path)


def test_editable_install_is_refused_with_the_fix_but_kit_is_replaced(conda_prefix, tmp_path):
    dist(conda_prefix, "kit", "0.1.0", editable=str(tmp_path / "checkout"))
    assert envscan.check_editable(scan(conda_prefix)) == []  # kit: replaced by its wheel
    dist(conda_prefix, "mylib", "2.0", editable="/home/me/mylib")
    (problem,) = envscan.check_editable(scan(conda_prefix))
    assert problem.check == "editable"
    assert "mylib 2.0" in problem.message and "/home/me/mylib" in problem.message and "without -e" in problem.message


def test_pth_path_outside_the_env_is_refused(conda_prefix, tmp_path):
    outside = tmp_path / "hack"
    outside.mkdir()
    (conda_prefix / SITE / "conda.pth").write_text(f"{outside}\n")
    (problem,) = envscan.check_editable(scan(conda_prefix))
    assert "conda.pth" in problem.message and str(outside) in problem.message


def test_clobbered_conda_file_names_both_packages(conda_prefix):
    assert envscan.check_conda_files(scan(conda_prefix)) == []
    dist(conda_prefix, "evil", "9.9", files=["flask/__init__.py"])
    (conda_prefix / SITE / "flask" / "__init__.py").write_text("# replaced by pip, longer than before\n")
    problems = envscan.check_conda_files(scan(conda_prefix))
    msgs = " | ".join(p.message for p in problems)
    assert "pip package evil 9.9 overwrote files of conda package flask 1.0" in msgs
    assert "conda install --force-reinstall flask" in msgs and "size differs" in msgs


def test_missing_conda_file_is_reported_and_real_conda_pack_agrees(conda_prefix):
    (conda_prefix / SITE / "flask" / "__init__.py").unlink()
    (problem,) = envscan.check_conda_files(scan(conda_prefix))
    assert "flask 1.0 are missing" in problem.message and "flask/__init__.py" in problem.message
    import conda_pack
    with pytest.raises(conda_pack.CondaPackException, match="deleted/overwritten"):
        conda_pack.CondaEnv.from_prefix(str(conda_prefix))


def test_missing_history_is_refused_with_the_fix_and_conda_pack_would_crash(conda_prefix, tmp_path):
    (conda_prefix / "conda-meta" / "history").unlink()
    (problem,) = envscan.check_history(scan(conda_prefix))
    assert f"touch {conda_prefix}/conda-meta/history" in problem.message
    import conda_pack
    with pytest.warns(UserWarning, match="without entries in the package cache"):  # synthetic: no pkgs cache
        env = conda_pack.CondaEnv.from_prefix(str(conda_prefix))
    with pytest.raises(Exception, match="mtime"):  # what the user would otherwise see
        env.pack(output=str(tmp_path / "x.tar.gz"))


def test_platform_mismatches(conda_prefix):
    assert envscan.check_platform(scan(conda_prefix)) == []
    (p,) = envscan.check_platform(scan(conda_prefix), target="linux-aarch64")
    assert "linux-x86_64 but the target platform is linux-aarch64" in p.message
    dist(conda_prefix, "macwheel", "1.0", tag="cp311-cp311-macosx_11_0_arm64")
    dist(conda_prefix, "oldwheel", "1.0", tag="cp310-cp310-manylinux_2_17_x86_64")
    dist(conda_prefix, "goodwheel", "1.0", tag="cp311-cp311-manylinux_2_28_x86_64")
    conda_pkg(conda_prefix, "osxonly", {"lib/libosx.dylib": b"x"}, subdir="osx-arm64")
    msgs = " | ".join(p.message for p in envscan.check_platform(scan(conda_prefix)))
    assert "macwheel" in msgs and "oldwheel" in msgs and "goodwheel" not in msgs
    assert "osxonly 1.0 (osx-arm64)" in msgs


def test_kit_missing_from_env_is_refused(conda_prefix):
    s = envscan.scan(conda_prefix, info={**INFO, "fingerprint": None, "kit_error": "ModuleNotFoundError: kit"})
    (p,) = envscan.check_kit(s)
    assert "kit is not importable" in p.message and "pip install" in p.message


def test_runtime_catches_a_changed_file(tmp_path):
    (tmp_path / "a.txt").write_text("packed")
    from kit._io import sha256_file

    manifest = {"files": {"a.txt": sha256_file(tmp_path / "a.txt"), "gone.txt": "0" * 64}}
    with pytest.raises(IntegrityError, match="gone.txt: missing"):
        check_files(tmp_path, manifest)
    del manifest["files"]["gone.txt"]
    assert check_files(tmp_path, manifest) == 1
    (tmp_path / "a.txt").write_text("changed")
    with pytest.raises(IntegrityError, match="a.txt: sha256 differs"):
        check_files(tmp_path, manifest)


def test_service_without_toml_and_cli_errors(tmp_path):
    from kit.cli import cli

    with pytest.raises(PackError, match="no service.toml"):
        read_service(tmp_path)
    res = CliRunner().invoke(cli, ["pack", str(tmp_path)])
    assert res.exit_code == 2 and "kit: error:" in res.output and "no service.toml" in res.output
    f = tmp_path / "x.tar.gz"
    f.write_bytes(b"")
    res = CliRunner().invoke(cli, ["pack", str(f)])
    assert res.exit_code == 2 and "--verify" in res.output
