"""kit._io: atomic writes leave the old file or the whole new one, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from kit._io import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})
    atomic_write_json(p, {"v": 2})
    assert p.read_text().strip().endswith("}") and '"v": 2' in p.read_text()
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    p = tmp_path / "aliases.json"
    atomic_write_text(p, "{}")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~old, "readable by a service running as another user"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})
    assert '"v": 1' in p.read_text()
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]
