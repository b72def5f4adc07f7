"""kit.env: fingerprints and how drift is graded."""

from __future__ import annotations

import dataclasses

from kit.env import Fingerprint, diff, fingerprint, write_lock


def test_fingerprint_describes_this_environment(repo_root):
    fp = fingerprint(repo_root)
    assert fp.python.count(".") == 2 and fp.torch and fp.torch.startswith("2.13")
    assert fp.platform.startswith("linux-")
    assert "torch" in fp.distributions and "kit" not in fp.distributions
    assert len(fp.distributions_sha256) == 64
    assert fp.environment_yml_sha256 and len(fp.environment_yml_sha256) == 64
    assert Fingerprint.from_dict(fp.to_dict()) == fp
    assert "torch 2.13" in fp.summary()


def _fp(**kw) -> Fingerprint:
    base = Fingerprint(python="3.11.7", implementation="CPython", torch="2.13.0+cpu", cuda=None,
                       platform="linux-x86_64", libc="glibc-2.36", conda_prefix=None, conda_name=None,
                       prefix="/env", distributions_sha256="x", distributions={"numpy": "2.4.6", "flask": "3.1.3"})
    return dataclasses.replace(base, **kw)


def test_identical_is_clean():
    assert diff(_fp(), _fp()).items == ()


def test_python_and_torch_minor_changes_are_errors():
    r = diff(_fp(), _fp(python="3.12.1", torch="2.14.0+cpu"))
    assert {d.field for d in r.errors} == {"python", "torch"} and not r.ok
    try:
        r.raise_for_errors("the server")
    except Exception as exc:
        assert "python changed 3.11.7 -> 3.12.1" in str(exc) and "make env" in str(exc)
    else:
        raise AssertionError("expected EnvDriftError")


def test_patch_levels_are_warnings_and_packages_never_errors():
    r = diff(_fp(), _fp(python="3.11.9", torch="2.13.1+cpu",
                        distributions={"numpy": "2.4.7", "flask": "4.0.0", "new": "1.0"}))
    assert r.ok
    sev = {d.field: d.severity for d in r.items}
    assert sev == {"python": "warning", "torch": "warning", "numpy": "warning", "flask": "warning", "new": "warning"}


def test_platform_change_is_an_error():
    assert not diff(_fp(), _fp(platform="linux-aarch64")).ok


def test_lock_is_written_and_hashed(tmp_path):
    p = write_lock(tmp_path)
    assert p.is_file()
    assert fingerprint(tmp_path).lock_sha256 is not None


def test_lock_is_what_the_running_environment_is_compared_with(tmp_path):
    import json

    from kit.env import read_lock

    assert read_lock(tmp_path) is None
    write_lock(tmp_path)
    lock = read_lock(tmp_path)
    assert lock is not None and diff(lock, fingerprint(tmp_path)).items == ()
    path = tmp_path / ".kit" / "environment.lock.json"
    data = json.loads(path.read_text())
    data["torch"] = "2.12.0+cpu"
    data["distributions"]["numpy"] = "0.0.1"
    path.write_text(json.dumps(data))
    report = diff(read_lock(tmp_path), fingerprint(tmp_path))
    assert [d.field for d in report.errors] == ["torch"] and "numpy" in {d.field for d in report.warnings}
    path.write_text("{broken")
    try:
        read_lock(tmp_path)
    except Exception as exc:
        assert "make lock" in str(exc)
    else:
        raise AssertionError("a broken lock must be reported")


def test_names_from_dist_info_folders_equal_the_metadata():
    """The fingerprint reads names and versions from dist-info folder names; they must say what METADATA says."""
    import importlib.metadata

    from kit.env import _name_and_version, _norm

    dists = list(importlib.metadata.distributions())
    assert len(dists) > 20
    for dist in dists:
        name, version = _name_and_version(dist)
        assert (_norm(name or ""), version) == (_norm(dist.metadata["Name"] or ""), dist.version), dist
