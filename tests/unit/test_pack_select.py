"""kit.pack.select on a small made-up environment: the shipped set is the closure of what the service's
backend requires (read from installed metadata), the rest is left out with its reason, and the paths that
stay out leave no empty package folder behind (an empty ``torch/`` would import as a namespace package)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from kit.errors import PackError
from kit.pack import envscan
from kit.pack.audit import missing_message
from kit.pack.select import PackSettings, read_pack_settings, report, select, shipped_fingerprint

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
SITE = f"lib/python{PY}/site-packages"
ABI = f"cp{sys.version_info[0]}{sys.version_info[1]}"

# name -> (version, Requires-Dist lines, top-level package)
DISTS = {
    "kit": ("0.1.0", ["torch>=2", "numpy", "pyjwt[crypto]>=2", 'pytest; extra == "dev"', 'onnxruntime; extra == "onnx"'],
            "kit"),
    "torch": ("2.13.0", ["sympy", "filelock", 'pyyaml; extra == "pyyaml"'], "torch"),
    "sympy": ("1.14", ["mpmath"], "sympy"),
    "mpmath": ("1.3", [], "mpmath"),
    "filelock": ("3.1", [], "filelock"),
    "numpy": ("2.1", [], "numpy"),
    "pyjwt": ("2.9", ['cryptography>=3; extra == "crypto"', 'typing_extensions; python_version < "3.0"'], "jwt"),
    "cryptography": ("44", ["cffi"], "cryptography"),
    "cffi": ("1.17", [], "cffi"),
    "typing-extensions": ("4.12", [], "typing_extensions"),
    "onnxruntime": ("1.20", ["numpy", "sympy"], "onnxruntime"),
    "pytest": ("8.3", ["pluggy"], "pytest"),
    "pluggy": ("1.5", [], "pluggy"),
    "jupyterlab": ("4.2", [], "jupyterlab"),
    "pyyaml": ("6.0", [], "yaml"),
}


def make_env(tmp_path: Path, dists: dict[str, tuple[str, list[str], str]] = DISTS) -> envscan.EnvScan:
    prefix = tmp_path / "env"
    site = prefix / SITE
    site.mkdir(parents=True)
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (prefix / "bin").mkdir()
    for name, (version, requires, top) in dists.items():
        meta = site / f"{name.replace('-', '_')}-{version}.dist-info"
        meta.mkdir()
        reqs = "".join(f"Requires-Dist: {r}\n" for r in requires)
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{reqs}\n")
        pkg = site / top
        (pkg / "sub").mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"# {name}\n")
        (pkg / "sub" / "core.py").write_text("x = 1\n" * 100)
        (pkg / "__pycache__").mkdir(exist_ok=True)
        (pkg / "__pycache__" / f"__init__.cpython-{ABI[2:]}.pyc").write_bytes(b"\0" * 16)  # not in RECORD
        (prefix / "bin" / f"{name}-cli").write_text("#!/bin/sh\n")
        rec = [f"{top}/__init__.py,,", f"{top}/sub/core.py,,", f"../../../bin/{name}-cli,,",
               f"{meta.name}/METADATA,,", f"{meta.name}/RECORD,,"]
        (meta / "RECORD").write_text("\n".join(rec) + "\n")
    info = {"python": ".".join(map(str, sys.version_info[:3])), "abi": ABI, "platform": "linux-x86_64",
            "prefix": str(prefix), "purelib": str(site), "base_executable": sys.executable,
            "fingerprint": {"python": "3", "torch": "2.13.0", "cuda": None, "onnxruntime": "1.20",
                            "distributions": {n: v for n, (v, _r, _t) in dists.items() if n != "kit"},
                            "distributions_sha256": "x"}}
    return envscan.scan(prefix, info=info)


def rescan(s: envscan.EnvScan) -> envscan.EnvScan:
    return envscan.scan(s.prefix, info={
        "python": s.python, "abi": s.abi, "platform": s.platform, "prefix": str(s.prefix),
        "purelib": str(s.prefix / SITE), "base_executable": sys.executable, "fingerprint": s.fingerprint})


def test_torch_backend_ships_the_closure_of_kits_requirements_and_names_why_the_rest_stays_out(tmp_path):
    s = make_env(tmp_path)
    sel = select(s, "torch")
    assert set(sel.shipped) == {"kit", "torch", "sympy", "mpmath", "filelock", "numpy", "pyjwt", "cryptography",
                                "cffi"}  # pyjwt[crypto] pulls cryptography; no extra, no old-Python marker
    assert sel.shipped["torch"] == "2.13.0"
    assert sel.left_out["pytest"] == "test tool; not required by the service"
    assert sel.left_out["jupyterlab"].startswith("Jupyter")
    assert sel.left_out["onnxruntime"] == "not required by the service"
    assert sel.left_out["pyyaml"] == "not required by the service"  # torch's extra, not asked for
    assert sel.modules["pyyaml"] == ("yaml",)
    text = "\n".join(report(sel))
    assert "torch backend" in text and "9 shipped" in text and "pytest" in text


def test_onnxruntime_backend_ships_no_torch_and_leaves_no_empty_torch_folder(tmp_path):
    s = make_env(tmp_path)
    sel = select(s, "onnxruntime")
    assert "torch" not in sel.shipped and "onnxruntime" in sel.shipped
    assert {"sympy", "mpmath", "numpy"} <= set(sel.shipped) and "filelock" not in sel.shipped
    assert sel.left_out["torch"] == "not used by the onnxruntime backend"
    ex = sel.exclude_paths

    def gone(rel: str) -> bool:  # as the layer writers read the set: a path, or a folder above it
        return any(p in ex for p in [rel, *(str(q) for q in Path(rel).parents)])

    torch_dir = os.path.join(SITE, "torch")
    # the RECORD'd files, the bytecode nobody recorded, and the folders left empty: all out
    assert torch_dir in ex and gone(os.path.join(torch_dir, "sub", "core.py"))
    assert gone(os.path.join(torch_dir, "__pycache__", f"__init__.cpython-{ABI[2:]}.pyc"))
    assert "bin/torch-cli" in ex and gone(os.path.join(SITE, "torch-2.13.0.dist-info", "METADATA"))
    # what is shipped is untouched, and folders shared with shipped things stay
    assert not gone(os.path.join(SITE, "numpy", "__init__.py"))
    assert not gone(os.path.join(SITE, "numpy", "__pycache__", f"__init__.cpython-{ABI[2:]}.pyc"))
    assert SITE not in ex and "bin" not in ex and not gone("bin/numpy-cli")


def test_a_folder_shared_with_a_shipped_distribution_is_walked_and_only_emptied_parts_go(tmp_path):
    """Two distributions in one top-level folder (a namespace package): the left-out one's files, their
    bytecode and its emptied subfolder go; the folder and the shipped one's files stay."""
    dists = dict(DISTS)
    dists["kit"] = ("0.1.0", ["torch", "nspkg-a"], "kit")
    dists["nspkg-a"] = ("1", [], "ns")
    dists["nspkg-b"] = ("1", [], "ns")  # same top-level folder "ns": make_env gives both ns/sub/core.py
    s = make_env(tmp_path, dists)
    site = s.prefix / SITE
    (site / "ns" / "b_only").mkdir()
    (site / "ns" / "b_only" / "mod.py").write_text("x = 2\n")
    (site / "ns" / "b_only" / "__pycache__").mkdir()
    (site / "ns" / "b_only" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    meta = next(site.glob("nspkg_b-*.dist-info"))
    with open(meta / "RECORD", "a") as f:
        f.write("ns/b_only/mod.py,,\n")
    sel = select(rescan(s), "torch")
    ex = sel.exclude_paths
    assert "nspkg-a" in sel.shipped and "nspkg-b" in sel.left_out
    assert os.path.join(SITE, "ns") not in ex and os.path.join(SITE, "ns", "__init__.py") not in ex
    assert {os.path.join(SITE, "ns", "b_only"), os.path.join(SITE, "ns", "b_only", "__pycache__")} <= ex


def test_onnxruntime_backend_without_onnxruntime_installed_says_how_to_fix_it(tmp_path):
    s = make_env(tmp_path, {k: v for k, v in DISTS.items() if k != "onnxruntime"})
    with pytest.raises(PackError, match="pip install onnxruntime"):
        select(s, "onnxruntime")


def test_pack_toml_and_the_command_line_include_and_exclude(tmp_path):
    s = make_env(tmp_path)
    svc = tmp_path / "svc"
    svc.mkdir()
    (svc / "pack.toml").write_text('[pack]\ninclude = ["PyYAML"]\nexclude = ["cffi"]\n')
    settings = read_pack_settings(svc, include=("jupyterlab",))
    assert settings == PackSettings(include=("pyyaml", "jupyterlab"), exclude=("cffi",))
    sel = select(s, "torch", settings)
    assert {"pyyaml", "jupyterlab"} <= set(sel.shipped)
    assert sel.left_out["cffi"] == "excluded by pack.toml / --exclude"
    with pytest.raises(PackError, match="not installed"):
        select(s, "torch", PackSettings(include=("nothere",)))


@pytest.mark.parametrize("text, match", [
    ("[pack]\ninclude = 'torch'\n", "must be a list"),
    ("[pack]\nextras = []\n", "only \\[pack\\]"),
    ("[other]\n", "only \\[pack\\]"),
    ("[pack\n", "not valid TOML"),
])
def test_a_bad_pack_toml_is_refused_with_the_fix(tmp_path, text, match):
    (tmp_path / "pack.toml").write_text(text)
    with pytest.raises(PackError, match=match):
        read_pack_settings(tmp_path)


def test_the_shipped_fingerprint_is_that_of_exactly_what_was_shipped(tmp_path):
    s = make_env(tmp_path)
    assert s.fingerprint is not None
    sel = select(s, "onnxruntime")
    fp = shipped_fingerprint(s.fingerprint, sel)
    assert set(fp["distributions"]) == set(sel.shipped) - {"kit"}
    # the formula kit.env.fingerprint uses for the environment it runs in
    assert fp["distributions_sha256"] == hashlib.sha256(
        json.dumps(fp["distributions"], sort_keys=True).encode()).hexdigest()
    assert fp["torch"] is None and fp["onnxruntime"] == "1.20"
    fp_t = shipped_fingerprint(s.fingerprint, select(s, "torch"))
    assert fp_t["torch"] == "2.13.0" and fp_t["onnxruntime"] is None


def test_torch_ships_without_its_headers_and_cpp_test_binaries(tmp_path):
    s = make_env(tmp_path)
    inc = s.prefix / SITE / "torch" / "include"
    inc.mkdir()
    (inc / "ATen.h").write_text("// header\n" * 50)
    meta = next((s.prefix / SITE).glob("torch-*.dist-info"))
    with open(meta / "RECORD", "a") as f:
        f.write("torch/include/ATen.h,,\n")
    sel = select(rescan(s), "torch")
    assert os.path.join(SITE, "torch", "include", "ATen.h") in sel.exclude_paths
    assert os.path.join(SITE, "torch", "include") in sel.exclude_paths
    assert os.path.join(SITE, "torch", "__init__.py") not in sel.exclude_paths
    assert any(k.startswith("torch/include") for k in sel.trimmed)


def test_a_missing_import_is_named_with_the_distribution_left_out_and_the_fix():
    manifest = {"selection": {"left_out": {"pyyaml": {"reason": "excluded by pack.toml / --exclude",
                                                      "modules": ["yaml"]}}}}
    msg = missing_message("yaml.constructor", manifest)
    assert "imports yaml.constructor" in msg and "pyyaml was left out (excluded by pack.toml" in msg
    assert "[pack] include" in msg and "--include pyyaml" in msg
    assert "not in the archive's environment" in missing_message("nothing_known", manifest)


def test_a_conda_package_goes_out_only_with_every_python_distribution_it_installs(tmp_path):
    s = make_env(tmp_path)
    meta = s.prefix / "conda-meta"
    meta.mkdir()
    (meta / "history").write_text("")
    torch_files = [os.path.join(SITE, "torch", "__init__.py"), os.path.join(SITE, "torch-2.13.0.dist-info", "METADATA"),
                   "lib/libtorch_cpu.so"]
    (s.prefix / "lib" / "libtorch_cpu.so").write_bytes(b"\x7fELF")
    (s.prefix / "lib" / "libssl.so").write_bytes(b"\x7fELF")
    for name, files in (("pytorch", torch_files), ("openssl", ["lib/libssl.so"])):
        (meta / f"{name}-1-0.json").write_text(json.dumps({"name": name, "version": "1", "build": "0",
                                                          "subdir": "linux-64", "files": files}))
    (s.prefix / "pyvenv.cfg").unlink()
    conda = rescan(s)
    assert conda.kind == "conda"
    sel = select(conda, "onnxruntime")
    assert {"lib/libtorch_cpu.so", "conda-meta/pytorch-1-0.json"} <= sel.exclude_paths  # torch's conda package
    assert "lib/libssl.so" not in sel.exclude_paths and "conda-meta/openssl-1-0.json" not in sel.exclude_paths


def test_the_pre_pack_checks_judge_what_is_shipped_not_what_is_left_out(tmp_path):
    """An editable install the service does not need no longer blocks the pack; one it needs still does."""
    from kit.pack.select import shipped_scan

    s = make_env(tmp_path)
    meta = next((s.prefix / SITE).glob("jupyterlab-*.dist-info"))
    (meta / "direct_url.json").write_text(json.dumps({"url": "file:///home/me/jlab", "dir_info": {"editable": True}}))
    s = rescan(s)
    assert envscan.check_editable(s)  # the whole environment has a problem ...
    sel = select(s, "torch")
    assert envscan.check_editable(shipped_scan(s, sel)) == []  # ... that the archive does not have
    meta = next((s.prefix / SITE).glob("numpy-*.dist-info"))
    (meta / "direct_url.json").write_text(json.dumps({"url": "file:///home/me/np", "dir_info": {"editable": True}}))
    s = rescan(s)
    (problem,) = envscan.check_editable(shipped_scan(s, select(s, "torch")))
    assert "numpy" in problem.message


def test_kit_pack_passes_include_exclude_and_compression_through(tmp_path, monkeypatch):
    """The command only parses: --include/--exclude/--compress reach pack() as they were given."""
    from click.testing import CliRunner

    import kit.pack
    from kit.cli import cli
    from kit.pack import PackResult

    seen = {}

    def fake_pack(target, **kw):
        seen.update(kw)
        return PackResult(archive=tmp_path / "a.tar.zst", size_bytes=1, kind="venv", seconds=0.1, models={"m": [1]},
                          backend="onnxruntime", compression=kw["compression"])

    monkeypatch.setattr(kit.pack, "pack", fake_pack)
    res = CliRunner().invoke(cli, ["pack", str(tmp_path), "--include", "pyyaml", "--exclude", "orjson",
                                   "--exclude", "cffi", "--compress", "zstd"])
    assert res.exit_code == 0, res.output
    assert seen["include"] == ("pyyaml",) and seen["exclude"] == ("orjson", "cffi") and seen["compression"] == "zstd"
    assert "onnxruntime" in res.output
