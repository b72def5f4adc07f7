"""Issue 17, classes 3 and 4: a registry writer without a key swaps files while Kit reads them
(check-then-use), or copies a signed version to another place (replay). Loads verify meta.json from one
read and map/parse a local verified cache (kit.registry.cache), never the registry's files.

Real files, real threads; the swapper is a thread of this process doing what a writer on the share does
(os.replace of whole files, in a loop).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import time

import pytest
import torch
from torch import nn

from kit.capture import capture
from kit.errors import IntegrityError, KitError, SignatureError
from kit.registry import Registry, artifact_digest
from kit.registry import cache as cache_mod
from kit.registry.cache import SEAL, VersionCache, default_cache_dir
from kit.signing import Keyring

X = torch.ones(1, 4)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3))


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "reg", user="alice", keyring=Keyring(tmp_path / "keys"),
                    cache_dir=tmp_path / "cache")


@pytest.fixture
def good_and_evil(reg, tmp_path):
    """m@1 signed with the project key, and the attacker's files for the same place: their own weights in
    model.pt2 and a meta.json re-hashed for them (the attacker has no key, so meta.json.sig stays good)."""
    mv = reg.register("m", _model(0), X)
    evil = tmp_path / "evil"
    files = [p for p in capture(_model(1), X).save(evil)]
    meta = json.loads((mv.path / "meta.json").read_bytes())
    from kit._io import sha256_file

    meta["files"] = {p.name: sha256_file(p) for p in files}
    meta["artifact_sha256"] = artifact_digest(meta["files"])
    (evil / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    good = tmp_path / "good"
    shutil.copytree(mv.path, good)
    return mv, good, evil


def _answers(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.module(X)


def _swapper(mv, good, evil, names, stop: threading.Event) -> threading.Thread:
    """Flip ``names`` in the version folder between the good and the attacker's copies, as fast as it can."""
    def run() -> None:
        i = 0
        while not stop.is_set():
            src = evil if i % 2 == 0 else good
            for n in names:
                tmp = mv.path / f".swap-{n}"
                shutil.copyfile(src / n, tmp)
                os.replace(tmp, mv.path / n)
            i += 1
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("names", [("meta.json",), ("meta.json", "model.pt2"), ("model.pt2",)])
def test_a_writer_swapping_files_in_a_loop_never_gets_attacker_bytes_loaded_as_signed(reg, good_and_evil, tmp_path,
                                                                                      names):
    mv, good, evil = good_and_evil
    with torch.inference_mode():
        want = _model(0)(X)
        evil_out = _model(1)(X)
    assert not torch.allclose(want, evil_out)
    stop = threading.Event()
    t = _swapper(mv, good, evil, names, stop)
    loads, refused, attacker = 0, 0, 0
    deadline = time.monotonic() + 40
    try:
        for i in range(200):
            if time.monotonic() > deadline:
                break
            reg.cache = VersionCache(tmp_path / "caches" / str(i))  # a cold cache: every load copies
            try:
                loaded = reg.load("m", 1, check_env=False)
            except KitError:
                refused += 1
                continue
            loads += 1
            out = _answers(loaded)
            if not torch.allclose(out, want):
                attacker += 1
            assert loaded.signed_by is not None
            assert loaded.version.files == json.loads((good / "meta.json").read_bytes())["files"]
    finally:
        stop.set()
        t.join(5)
    print(f"swapping {names}: {loads} loads, {refused} refused, {attacker} attacker")
    assert attacker == 0, f"{attacker} of {loads} loads served the attacker's weights as signed"
    assert loads + refused >= 50 and loads > 0, (loads, refused)


def test_a_served_version_survives_its_registry_files_being_truncated_and_deleted(reg):
    mv = reg.register("m", _model(0), X)
    loaded = reg.load("m", 1, check_env=False)
    want = _answers(loaded)
    assert loaded.files_dir is not None and reg.cache.root in loaded.files_dir.parents
    with open(mv.path / "model.pt2", "r+b") as f:  # in place: the old mapping of the registry's file died here
        f.truncate(0)
    assert torch.equal(_answers(loaded), want)
    (mv.path / "example.npz").unlink()
    assert loaded.check_reference() == 0.0
    again = reg.load("m", 1, check_env=False)  # a cache hit: the registry's artifacts are not read
    assert torch.equal(_answers(again), want) and again.files_dir == loaded.files_dir
    with pytest.raises(IntegrityError, match="model.pt2"):
        reg.check_integrity(mv)  # checks still see what the registry holds


def test_a_signed_version_copied_to_another_number_or_name_is_refused(reg):
    mv = reg.register("m", _model(0), X)
    reg.register("m", _model(1), X)
    shutil.rmtree(reg.version_dir("m", 2))
    shutil.copytree(mv.path, reg.version_dir("m", 2))  # replay 1 as 2 (a downgrade under a new number)
    with pytest.raises(IntegrityError, match=r"signed for m@1 but sits at m@2"):
        reg.load("m", 2, check_env=False)
    (reg.root / "n" / "versions").mkdir(parents=True)
    shutil.copytree(mv.path, reg.version_dir("n", 1))  # replay under another model name
    with pytest.raises(IntegrityError, match=r"signed for m@1 but sits at n@1"):
        reg.load("n", 1, check_env=False)
    (bad,) = reg.verify("n", 1)
    assert not bad.ok and "sits at n@1" in bad.problems[0]
    with pytest.raises(IntegrityError, match="sits at n@1"):
        reg.check_integrity(reg.get("n", 1))
    assert reg.load("m", 1, check_env=False).signed_by is not None
    with pytest.raises(IntegrityError, match="sits at m@2"):
        reg.promote("m", 2, force=True, why="forcing overrides the gate, never integrity")


def test_a_meta_without_its_place_is_refused_until_resigned(reg):
    mv = reg.register("m", _model(0), X)
    meta = json.loads((mv.path / "meta.json").read_bytes())
    del meta["name"], meta["version"]
    (mv.path / "meta.json").write_text(json.dumps(meta))
    from kit.signing import sign_file

    sign_file(mv.path / "meta.json", reg.keyring.signer())  # signed, but bound to no place
    with pytest.raises(IntegrityError, match=r"does not name its model and version.*kit keys sign m@1"):
        reg.load("m", 1, check_env=False)
    reg.sign_version("m", 1)
    assert json.loads((mv.path / "meta.json").read_bytes())["version"] == 1
    assert reg.load("m", 1, check_env=False).signed_by is not None


def test_a_file_changed_while_being_copied_leaves_no_cache_entry(reg):
    mv = reg.register("m", _model(0), X)
    with open(mv.path / "model.pt2", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"model.pt2: sha256 .* != recorded"):
        reg.load("m", 1, check_env=False)
    assert reg.cache.entries() == [] and not list(reg.cache.root.glob(".tmp-*"))


def test_a_tampered_or_foreign_looking_entry_is_rebuilt_not_trusted(reg):
    mv = reg.register("m", _model(0), X)
    want = _answers(reg.load("m", 1, check_env=False))
    (entry,) = reg.cache.entries()
    seal = json.loads((entry / SEAL).read_bytes())
    assert set(seal["files"]) == set(mv.files) and stat.S_IMODE(entry.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((entry / f).stat().st_mode) == 0o400 for f in mv.files)
    evil = entry / "model.pt2"
    os.chmod(evil, 0o600)
    data = bytearray(evil.read_bytes())
    evil.write_bytes(bytes(data[:-1]))  # a changed size (and mtime): the stamp no longer matches
    assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)
    (entry,) = reg.cache.entries()
    os.chmod(entry, 0o755)  # another user could have written it: not ours any more
    assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)
    assert stat.S_IMODE(reg.cache.entries()[0].stat().st_mode) == 0o700
    (reg.cache.entries()[0] / SEAL).unlink()  # never sealed: never trusted
    assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)


def test_prune_keeps_what_is_asked_and_removes_the_rest(reg):
    reg.register("m", _model(0), X)
    v2 = reg.register("m", _model(1), X)
    reg.load("m", 1, check_env=False)
    reg.load("m", 2, check_env=False)
    assert len(reg.cache.entries()) == 2
    assert reg.cache.prune(keep_artifacts=[v2.artifact_sha256], unused_for_s=3600) == []  # both recently used
    removed = reg.cache.prune(keep_artifacts=[v2.artifact_sha256])
    assert len(removed) == 1 and [e.name.split("-")[0] for e in reg.cache.entries()] == [v2.artifact_sha256]


def test_the_default_cache_location():
    assert default_cache_dir(environ={"KIT_CACHE_DIR": "/c"}) == default_cache_dir(environ={"KIT_CACHE_DIR": "/c"})
    assert str(default_cache_dir(environ={"KIT_CACHE_DIR": "/c"})) == "/c/versions"
    assert str(default_cache_dir("svc", environ={"XDG_CACHE_HOME": "/x"})) == "/x/kit/services/svc"
    assert str(default_cache_dir(environ={"HOME": "/h"})).endswith(".cache/kit/versions")


def test_signature_file_over_the_cap_or_not_regular_is_a_signature_error(reg):
    mv = reg.register("m", _model(0), X)
    sig = mv.path / "meta.json.sig"
    sig.write_bytes(b" " * (65 << 10))
    with pytest.raises(SignatureError, match="unreadable"):
        reg.load("m", 1, check_env=False)
    sig.unlink()
    os.mkfifo(sig)  # a reader that opened it without a check would block forever
    with pytest.raises(SignatureError, match="unreadable"):
        reg.load("m", 1, check_env=False)


def _seal(entry) -> dict:
    return json.loads((entry / SEAL).read_bytes())


def _tear(path) -> None:
    """What a crash leaves of bytes written without fsync: zeros where they were, the size and mtime intact."""
    st = path.stat()
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(bytes(st.st_size))
    os.chmod(path, 0o400)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_entry_from_another_boot_torn_with_its_stamp_intact_is_rehashed_and_rebuilt(reg, monkeypatch, caplog):
    mv = reg.register("m", _model(0), X)
    monkeypatch.setattr(cache_mod, "boot_id", lambda: "boot-a")
    want = _answers(reg.load("m", 1, check_env=False))
    (entry,) = reg.cache.entries()
    assert _seal(entry)["boot_id"] == "boot-a"
    _tear(entry / "model.pt2")
    monkeypatch.setattr(cache_mod, "boot_id", lambda: "boot-b")  # the machine crashed and booted again
    with caplog.at_level(logging.INFO, "kit.registry.cache"):
        assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)
    (entry,) = reg.cache.entries()
    assert (entry / "model.pt2").read_bytes() == (mv.path / "model.pt2").read_bytes()
    assert _seal(entry)["boot_id"] == "boot-b" and "not as sealed after a reboot" in caplog.text


def test_an_intact_entry_from_another_boot_is_rehashed_once_and_sealed_for_this_boot(reg, monkeypatch, caplog):
    mv = reg.register("m", _model(0), X)
    monkeypatch.setattr(cache_mod, "boot_id", lambda: "boot-a")
    want = _answers(reg.load("m", 1, check_env=False))
    (entry,) = reg.cache.entries()
    inodes = {f: (entry / f).stat().st_ino for f in mv.files}
    hashed: list[str] = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    monkeypatch.setattr(cache_mod, "boot_id", lambda: "boot-b")
    with caplog.at_level(logging.INFO, "kit.registry.cache"):
        assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)
    assert sorted(hashed) == sorted(mv.files) and "re-verified cache entry" in caplog.text
    assert reg.cache.entries() == [entry] and {f: (entry / f).stat().st_ino for f in mv.files} == inodes
    assert _seal(entry)["boot_id"] == "boot-b" and stat.S_IMODE((entry / SEAL).stat().st_mode) == 0o400
    hashed.clear()
    assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)  # a plain hit in this boot: stats only
    assert hashed == []
    seal = _seal(entry)
    del seal["boot_id"]  # as sealed where no boot id could be read (files fsync'd): trusted in any boot
    os.chmod(entry / SEAL, 0o600)
    (entry / SEAL).write_text(json.dumps(seal))
    monkeypatch.setattr(cache_mod, "boot_id", lambda: "boot-c")
    assert torch.equal(_answers(reg.load("m", 1, check_env=False)), want)
    assert hashed == [] and reg.cache.entries() == [entry]


def test_cache_files_are_fsyncd_only_where_no_boot_id_can_be_read(reg, monkeypatch, tmp_path):
    mv = reg.register("m", _model(0), X)
    synced: set[int] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for boot in (None, "boot-a"):
        monkeypatch.setattr(cache_mod, "boot_id", lambda boot=boot: boot)
        reg.cache = VersionCache(tmp_path / f"cache-{boot}")
        synced.clear()
        reg.load("m", 1, check_env=False)
        (entry,) = reg.cache.entries()
        written = {(entry / f).stat().st_ino for f in [*mv.files, "meta.json", SEAL]} | {entry.stat().st_ino}
        if boot is None:  # every file, the entry's folder and the cache root: as before boot ids
            assert written | {reg.cache.root.stat().st_ino} <= synced and "boot_id" not in _seal(entry)
        else:
            assert not written & synced and _seal(entry)["boot_id"] == boot
