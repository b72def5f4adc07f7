"""kit.pack.integrity's lists and ship steps, and the server-side model check, without processes.

run.sh's own checks (bash, coreutils, openssl, tar against changed archives) are in
tests/integration/test_pack_runsh.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from kit._io import sha256_file
from kit.errors import PackError
from kit.pack import integrity

STEM = "demo-v1-linux-x86_64"


def test_names_run_sh_cannot_list_are_refused_at_pack_time():
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


@pytest.mark.parametrize("name", ["env/.kit-unpacked", "env/.kit-unpacked.sha256", "env/.kit-unpacked.sha256.tmp"])
def test_the_record_run_sh_writes_is_never_packed(name):
    """An environment taken from an unpacked archive holds run.sh's record; run.sh refuses archives that do."""
    with pytest.raises(PackError, match="record run.sh writes on a server"):
        integrity.sums_text({f"{STEM}/{name}": "0" * 64}, STEM)
    assert integrity.sums_text({f"{STEM}/env/.kit-unpackedX": "0" * 64}, STEM)


def test_ship_steps_check_before_extracting_and_quote_what_they_name():
    steps = integrity.ship_steps("my demo.tar.gz", "my demo", trust="/etc/kit/packer.pem")
    assert [s.split()[0] for s in steps] == ["openssl", "sha256sum", "tar", "KIT_TRUST=/etc/kit/packer.pem"]
    assert shlex.split(steps[0]) == ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "/etc/kit/packer.pem",
                                     "-rawin", "-in", "my demo.tar.gz.sha256", "-sigfile", "my demo.tar.gz.sha256.sig"]
    assert shlex.split(steps[2]) == ["tar", "xzf", "my demo.tar.gz"]
    assert shlex.split(steps[3]) == ["KIT_TRUST=/etc/kit/packer.pem", "my demo/run.sh"]
    text = integrity.ship_text(Path("dist/my demo.tar.gz"), "my demo", "0123456789abcdef")
    assert "kit keys show 0123456789abcdef --pem" in text and " \\\n    && ".join(steps) in text
