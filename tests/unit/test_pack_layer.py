"""The cached environment layer: written once per shipped content, reused while that content is unchanged
(installing something the service does not ship does not invalidate it), and it holds no left-out path."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

from test_pack_select import SITE, make_env, rescan

from kit.pack.layer import env_layer
from kit.pack.select import select


def _names(layer) -> list[str]:
    data = gzip.decompress(layer.read_bytes()) + b"\0" * 1024  # the member has no end-of-archive blocks
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getnames()


def test_the_layer_is_reused_until_a_shipped_file_changes(tmp_path):
    s = make_env(tmp_path)
    sel = select(s, "onnxruntime")
    cache, work = tmp_path / "layers", tmp_path / "work"
    work.mkdir()

    def build():
        return env_layer(s, "demo/env", set(sel.exclude_paths), 1, cache, False, work, None)

    layer, reused, total, (hashes, _links) = build()
    assert not reused and layer.parent == cache and total > 0
    names = _names(layer)
    assert f"demo/env/{SITE}/numpy/__init__.py" in names and f"demo/env/{SITE}/numpy/__init__.py" in hashes
    assert not any(n.startswith(f"demo/env/{SITE}/torch") for n in names)  # left out: not even the folder
    assert build()[1] is True

    # a distribution the service does not need is installed (site-packages' mtime changes): still reused
    (s.prefix / SITE / "newpkg").mkdir()
    (s.prefix / SITE / "newpkg" / "__init__.py").write_text("")
    meta = s.prefix / SITE / "newpkg-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: newpkg\nVersion: 1.0\n\n")
    (meta / "RECORD").write_text(f"newpkg/__init__.py,,\n{meta.name}/METADATA,,\n{meta.name}/RECORD,,\n")
    s = rescan(s)
    sel = select(s, "onnxruntime")
    assert sel.left_out["newpkg"] == "not required by the service"
    assert build()[1] is True

    # a shipped file changes: written again
    numpy_init = s.prefix / SITE / "numpy" / "__init__.py"
    numpy_init.write_text("# changed\n")
    os.utime(numpy_init, ns=(1, 1))
    layer2, reused2, _t, (hashes2, _l) = build()
    assert not reused2 and hashes2[f"demo/env/{SITE}/numpy/__init__.py"] != hashes[f"demo/env/{SITE}/numpy/__init__.py"]


def test_kits_wheel_and_its_install_are_reused_while_the_source_is_unchanged(tmp_path, monkeypatch):
    """Two pip runs (wheel, install) per pack are saved while kit's source is the same; a changed file
    builds again."""
    from kit.pack import wheel as wheel_mod

    src = tmp_path / "src"
    (src / "kit").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'kit'\n")
    (src / "kit" / "__init__.py").write_text("__version__ = '0'\n")
    calls = []

    def fake_build(source, out_dir, progress=None):
        calls.append("build")
        out_dir.mkdir(parents=True, exist_ok=True)
        w = out_dir / "kit-0-py3-none-any.whl"
        w.write_bytes((source / "kit" / "__init__.py").read_bytes())
        return w

    def fake_install(w, target):
        calls.append("install")
        (target / "kit").mkdir(parents=True)
        (target / "kit" / "__init__.py").write_bytes(w.read_bytes())
        return []

    monkeypatch.setattr(wheel_mod, "build_kit_wheel", fake_build)
    monkeypatch.setattr(wheel_mod, "install_wheel", fake_install)
    cache = tmp_path / "cache"
    for i in range(2):
        w = wheel_mod.cached_kit_install(src, tmp_path / f"w{i}", tmp_path / f"i{i}", cache)
        assert w.parent == tmp_path / f"w{i}" and (tmp_path / f"i{i}" / "kit" / "__init__.py").is_file()
    assert calls == ["build", "install"]
    (src / "kit" / "__init__.py").write_text("__version__ = '1'\n")
    wheel_mod.cached_kit_install(src, tmp_path / "w2", tmp_path / "i2", cache)
    assert calls == ["build", "install"] * 2
    assert (tmp_path / "i2" / "kit" / "__init__.py").read_text() == "__version__ = '1'\n"
