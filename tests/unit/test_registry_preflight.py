"""``kit registry check`` of a folder registry, and the filesystem it reads from /proc/self/mountinfo."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kit.cli import cli
from kit.registry.preflight import OBJECT_FUSE, filesystem_of

MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /mnt/models rw,nosuid - fuse.s3fs s3fs rw,user_id=0
41 22 0:36 / /mnt/models\\040share rw - nfs4 server:/export rw
42 40 0:37 / /mnt/models/inner rw - tmpfs tmpfs rw
"""


def test_the_longest_mount_point_holding_a_path_names_its_filesystem():
    assert filesystem_of(Path("/srv/registry"), MOUNTINFO) == ("ext4", "/")
    assert filesystem_of(Path("/mnt/models/reg"), MOUNTINFO) == ("fuse.s3fs", "/mnt/models")
    assert filesystem_of(Path("/mnt/models share/reg"), MOUNTINFO) == ("nfs4", "/mnt/models share")
    assert filesystem_of(Path("/mnt/models/inner/x"), MOUNTINFO) == ("tmpfs", "/mnt/models/inner")
    assert filesystem_of(Path("/mnt/modelsX"), MOUNTINFO) == ("ext4", "/")  # a name that only starts alike
    assert "fuse.s3fs" in OBJECT_FUSE and "nfs4" not in OBJECT_FUSE


def _check(root: Path, *args: str) -> tuple[int, dict]:
    res = CliRunner().invoke(cli, ["--registry", str(root), "registry", "check", *args])
    return res.exit_code, (json.loads(res.stdout) if "--json" in args else {"text": res.stdout})


def test_a_folder_registry_is_checked_for_reading_and_writing(tmp_path: Path):
    (tmp_path / "reg" / "digits" / "versions").mkdir(parents=True)
    (tmp_path / "reg" / "\x1b[2Jevil" / "versions").mkdir(parents=True)  # a terminal escape is never printed
    code, out = _check(tmp_path / "reg", "--write", "--json")
    assert code == 0 and out["ok"]
    assert [(c["check"], c["status"]) for c in out["checks"]] == [("folder", "ok"), ("filesystem", "ok"),
                                                                  ("write", "ok")]
    assert "1 model(s): digits" in out["checks"][0]["detail"]
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["\x1b[2Jevil", "digits"]  # no probe left


def test_a_missing_folder_fails_with_the_fix(tmp_path: Path):
    code, out = _check(tmp_path / "nowhere")
    assert code == 1
    assert "FAIL" in out["text"] and "folder: Create it (the first register does)" in out["text"]
