"""kit.backends.pt2.archive: nothing in a .pt2 or .npz can run code, and opening one has a bounded cost.

Every crafted payload below is live: torch.export.load (or numpy with allow_pickle) would run it and create
the marker file (shown for the payloads torch runs on load). Kit refuses each before torch sees a byte.
"""

from __future__ import annotations

import zipfile

import crafted_artifacts as ca
import numpy as np
import pytest
import torch
from torch import nn

from kit.backends.checks import Limits, check_npz
from kit.backends.pt2.archive import inspect_pt2
from kit.capture import load_examples, load_program
from kit.errors import UnsafeArtifactError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return ca.good_archive(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize("kind", sorted(ca.PAYLOADS))
def test_crafted_payload_is_refused_naming_the_entry_and_never_runs(good, tmp_path, kind):
    marker = tmp_path / "pwned"
    bad = ca.rewrite(good, tmp_path / "model.pt2", ca.PAYLOADS[kind](marker))
    with pytest.raises(UnsafeArtifactError, match="Refusing to load .*model.pt2") as err:
        load_program(bad)
    assert "model/" in str(err.value), "the message names the entry or config"
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("kind", ["opaque_obj", "use_pickle_weight", "sample_inputs", "sympy_expr"])
@pytest.mark.filterwarnings("ignore")
def test_the_payloads_are_live_under_torch_export_load(good, tmp_path, kind):
    """The control: torch itself runs these payloads while loading, so the refusal above is what saves us."""
    marker = tmp_path / "pwned"
    bad = ca.rewrite(good, tmp_path / "model.pt2", ca.PAYLOADS[kind](marker))
    try:
        torch.export.load(bad)
    except Exception:
        pass  # torch often refuses, but only after the payload ran
    assert marker.exists()


def test_weights_are_mapped_from_the_file_not_copied(good):
    loaded = load_program(good)
    archive = inspect_pt2(good)
    buffers = list(loaded.buffers())
    base = buffers[0].untyped_storage().data_ptr()
    assert all(b.untyped_storage().data_ptr() == base for b in buffers), "one mapping of the file"
    with open(good, "rb") as f:
        entry = archive.entries["data/weights/weight_0"]
        f.seek(entry.data_offset)
        assert f.read(entry.size) == buffers[0].detach().contiguous().numpy().tobytes()


def test_zip_bomb_is_refused_before_decompressing(good, tmp_path):
    bomb = ca.zip_bomb(good, tmp_path / "model.pt2", gib=0.125)
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(UnsafeArtifactError, match=r"weight_7' expands \d+x .*zip bomb"):
        load_program(bomb)


def test_size_and_count_limits(good):
    with pytest.raises(UnsafeArtifactError, match="max_artifact_bytes"):
        inspect_pt2(good, Limits(max_bytes=1000))
    with pytest.raises(UnsafeArtifactError, match="entries exceed the limit of 5"):
        inspect_pt2(good, Limits(max_entries=5))


def test_overlapping_entries_and_duplicates_are_refused(good, tmp_path):
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        a, b = zf.getinfo("model/data/weights/weight_0"), zf.getinfo("model/data/weights/weight_1")
    # point weight_1's directory record at weight_0's local header: two entries, one set of bytes
    cd = data.rfind(b"PK\x01\x02" + data[data.find(b"PK\x01\x02") + 4:data.find(b"PK\x01\x02") + 4], 0)
    name = b"model/data/weights/weight_1"
    pos = data.find(name, data.find(b"PK\x01\x02"))
    hdr = pos - 46
    data[hdr + 42:hdr + 46] = a.header_offset.to_bytes(4, "little")
    (tmp_path / "model.pt2").write_bytes(bytes(data))
    with pytest.raises(UnsafeArtifactError, match="local header|share bytes"):
        inspect_pt2(tmp_path / "model.pt2")
    assert cd >= 0 and b.header_offset != a.header_offset


def test_truncated_and_non_zip_files(good, tmp_path):
    (tmp_path / "model.pt2").write_bytes(good.read_bytes()[:-200])
    with pytest.raises(UnsafeArtifactError, match="not a torch.export archive"):
        inspect_pt2(tmp_path / "model.pt2")
    with pytest.raises(UnsafeArtifactError, match=".pt2"):
        inspect_pt2(tmp_path / "model.onnx")


def test_object_npz_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    bad = ca.object_npz(marker, tmp_path / "example.npz")
    with pytest.raises(UnsafeArtifactError, match="input_0.npy.*object arrays are pickles"):
        load_examples(bad)
    assert not marker.exists()
    np.savez(tmp_path / "ok.npz", input_0=np.zeros((2, 3), np.float32), output_0=np.zeros(2, np.int64))
    check_npz(tmp_path / "ok.npz")


def test_service_toml_max_artifact_bytes_reaches_registry_load(tmp_path):
    from kit.registry import Registry
    from kit.servicegen import generate
    from kit.serving.config import load_service_config

    reg = Registry(tmp_path / "registry", require_gate=False, user="t")
    reg.register("tiny", nn.Linear(3, 2), torch.randn(2, 3))
    d = generate("tiny", "tiny", registry=reg.root, out_dir=tmp_path / "services", max_artifact_bytes=1024)
    assert "max_artifact_bytes = 1024" in (d / "service.toml").read_text()
    cfg = load_service_config(d, environ={})
    assert cfg.max_artifact_bytes == 1024
    with pytest.raises(UnsafeArtifactError, match=r"limit of 1024.*max_artifact_bytes"):
        reg.load("tiny", 1, max_artifact_bytes=cfg.max_artifact_bytes)
    reg.load("tiny", 1)  # the default (8 GiB) admits it
