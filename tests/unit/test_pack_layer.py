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
