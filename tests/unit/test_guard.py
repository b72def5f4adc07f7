"""kit.serving.guard (the canary guard's counting, merging and decision) and kit.serving.recorder (capture
files, rotation, dropped inputs), without processes: a real registry, a stand-in for a worker's slots.

The guard under real load (gunicorn, 2 workers) is tests/e2e/test_canary_guard.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from kit_testing import three_versions

from kit.errors import ServiceError
from kit.guard_key import load_or_create_guard_key
from kit.registry import Registry
from kit.serving.guard import CanaryGuard
from kit.serving.guard_stats import (
    GuardSettings,
    SideStats,
    bucket_of,
    bucket_upper,
    decide,
    merge,
    parse_guard_settings,
)
from kit.serving.recorder import CaptureSettings, Recorder, parse_capture_settings
from kit.signature import Signature, TensorSpec
from kit.signing import SigningKey
from kit.traffic import guard_stop, set_traffic

S = GuardSettings(enabled=True, min_requests=20, window_s=30.0, max_error_rate_increase=0.05, max_p95_ratio=2.0,
                  min_p95_delta_ms=5.0)


def side(n: int, err: int, ms: float) -> SideStats:
    return SideStats(n, err, ((bucket_of(ms / 1000), n),))


def test_buckets_bound_a_latency_within_20_percent():
    for s in (0.00005, 0.0004, 0.003, 0.05, 1.7):
        assert s <= bucket_upper(bucket_of(s)) <= max(s * 1.2 + 1e-12, 1e-4)


def test_decide_needs_evidence_on_both_sides_then_judges_errors_and_latency():
    assert decide(side(19, 0, 1), side(500, 400, 1), S) is None  # production has too few requests
    assert decide(side(500, 0, 1), side(19, 19, 1), S) is None
    v = decide(side(100, 1, 1), side(40, 10, 1), S)
    assert v is not None and v.reason == "errors" and "25.0%" in v.detail
    assert v.evidence["canary"]["requests"] == 40 and v.evidence["production"]["errors"] == 1
    assert decide(side(100, 1, 1), side(40, 2, 1), S) is None  # 5% vs 1%: inside +5 points
    v = decide(side(100, 0, 2), side(40, 0, 40), S)
    assert v is not None and v.reason == "latency" and v.evidence["canary"]["p95_ms"] >= 40
    assert decide(side(100, 0, 0.2), side(40, 0, 1.0), S) is None  # 5x slower but < 5 ms more: jitter
    assert decide(side(100, 0, 10), side(40, 0, 18), S) is None  # 1.8x: inside the ratio


def test_p95_of_a_mixed_histogram():
    st = SideStats(100, 0, tuple(sorted({bucket_of(0.001): 94, bucket_of(0.5): 6}.items())))
    assert st.p95() == pytest.approx(bucket_upper(bucket_of(0.5)))
    assert SideStats().p95() is None


def test_merge_sums_workers_inside_the_window():
    docs = [{"canary": [(100, 3, 1, ((5, 3),))], "production": [(90, 7, 0, ((5, 7),))]},
            {"canary": [(101, 2, 2, ((6, 2),))], "bogus": [(101, 9, 9, ())]}]
    m = merge(docs, since=95)
    assert (m["canary"].requests, m["canary"].errors, m["canary"].hist) == (5, 3, ((5, 3), (6, 2)))
    assert m["production"].requests == 0  # its bucket left the window


def test_settings_are_checked():
    assert parse_guard_settings({"enabled": True, "window_s": 10}, "x").window_s == 10.0
    with pytest.raises(ServiceError, match="unknown key 'windw'"):
        parse_guard_settings({"windw": 1}, "service.toml")
    with pytest.raises(ServiceError, match="min_requests"):
        parse_guard_settings({"min_requests": 0}, "service.toml")
    with pytest.raises(ServiceError, match="must be a int"):
        parse_guard_settings({"min_requests": True}, "service.toml")
    assert parse_capture_settings({"drop_inputs": ["ids"], "sample_rate": 1}, "x").drop_inputs == ("ids",)
    with pytest.raises(ServiceError, match="sample_rate"):
        parse_capture_settings({"sample_rate": 1.5}, "service.toml")


@dataclass
class _Slot:
    version: int


@dataclass
class _State:
    production: Any
    canary: Any
    serial: int
    weight: float = 0.0


class _Slots:
    def __init__(self, reg: Registry, name: str):
        self.reg, self.name = reg, name

    @property
    def state(self) -> _State:
        a = self.reg.aliases(self.name)
        return _State(_Slot(a.production) if a.production else None, _Slot(a.canary) if a.canary else None, a.serial,
                      a.canary_weight)


def _key(reg: Registry) -> SigningKey:
    """The guard key of the service these guards belong to (every worker holds the same one)."""
    service = Path(reg.root).parent / "service"
    service.mkdir(exist_ok=True)
    return load_or_create_guard_key(service)


def _guards(reg: Registry, n: int = 2, settings: GuardSettings = S) -> list[CanaryGuard]:
    guards = [CanaryGuard(settings, reg, "m", _Slots(reg, "m"), key=_key(reg)) for _ in range(n)]
    for i, g in enumerate(guards):
        g.worker = f"host-{i}"  # two workers of one test process
    return guards


def test_two_workers_add_up_and_end_a_failing_canary_once(tmp_path):
    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    serial = reg.aliases("m").serial
    g1, g2 = _guards(reg)
    t = 1_000_000.0
    for g in (g1, g2):
        assert g.tick(now=t) is None  # they learn the split
    for _ in range(12):  # 12 + 12 per side: enough only together (min 20)
        for g in (g1, g2):
            g.observe(1, 200, 0.001)
            g.observe(2, 500, 0.001)
            g.observe(3, 500, 0.001)  # not served here: ignored
    import time

    t = time.time()
    assert g1.tick(now=t) is None  # g1 shared its 12 + 12; g2 has not yet
    assert g1.window["canary"].requests == 12
    v = g2.tick(now=t)  # g2 sees 24 + 24: decides and ends the canary
    assert {p.name for p in (tmp_path / "reg" / "m" / "guard" / f"v2-s{serial}").iterdir()} == {"host-0.json",
                                                                                               "host-1.json"}
    assert v is not None and v.reason == "errors"
    a = reg.aliases("m")
    assert a.canary is None and a.serial == serial + 1
    ev = reg.history("m")[-1]
    assert ev["event"] == "canary_guard" and ev["version"] == 2 and ev["evidence"]["canary"]["requests"] == 24
    assert ev["evidence"]["canary"]["errors"] == 24 and ev["why"].startswith("canary guard: canary 5xx rate 100.0%")
    # g1 judges the same evidence a moment later: the canary is gone, nothing more happens (no flapping)
    g1._key = f"v2-s{serial}"
    assert g1.tick(now=t) is None
    assert guard_stop(reg, "m", 2, serial, {"detail": "stale"}) is None
    assert [e["event"] for e in reg.history("m")].count("canary_guard") == 1
    assert g1.status()["last_decision"]["evidence"]["canary"]["requests"] == 24  # from the audit log
    g2.tick()  # g2 moves on too: the finished split's window files and folder are gone
    assert not (tmp_path / "reg" / "m" / "guard" / f"v2-s{serial}").exists()


def test_a_healthy_canary_is_never_ended_and_a_moved_canary_is_left_alone(tmp_path):
    import time

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    (g,) = _guards(reg, 1)
    g.tick()
    for i in range(300):
        g.observe(1, 500 if i % 50 == 0 else 200, 0.002)
        g.observe(2, 500 if i % 60 == 0 else 200, 0.003)
    assert g.tick(now=time.time()) is None and reg.aliases("m").canary == 2
    serial = reg.aliases("m").serial
    set_traffic(reg, "m", 2, 0.3)  # a person re-weights: the evidence of serial N is stale
    assert guard_stop(reg, "m", 2, serial, {"detail": "stale"}) is None and reg.aliases("m").canary == 2


def _sig() -> Signature:
    return Signature((TensorSpec("ids", "int64", ("batch", 1)), TensorSpec("x", "float32", ("batch", 2))),
                     (TensorSpec("output_0", "float32", ("batch", 2)),))


def test_recorder_writes_samples_drops_inputs_and_rotates(tmp_path: Path):
    rec = Recorder(CaptureSettings(enabled=True, sample_rate=1.0, max_file_bytes=2048, max_bytes=6144,
                                   drop_inputs=("x",)), "m", tmp_path / "cap")
    ids, x, out = torch.tensor([[3]]), torch.tensor([[0.5, 1.5]]), torch.tensor([[0.25, 0.75]])
    rec.record("r0", 1, 200, 0.002, _sig(), (ids, x), (out,))
    rec.record("r1", 1, 500, 0.002, _sig(), (ids, x), (out,))  # errors are not captured
    rec.flush()
    (f,) = list((tmp_path / "cap").glob("*.jsonl"))
    doc = json.loads(f.read_text())
    assert doc["version"] == 1 and doc["inputs"]["ids"] == {"dtype": "int64", "shape": [1, 1], "data": [[3]]}
    assert doc["inputs"]["x"] is None and doc["outputs"]["output_0"]["data"] == [[0.25, 0.75]]
    for i in range(200):
        rec.record(f"r{i}", 2, 200, 0.001, _sig(), (ids, x), (out,))
    rec.close()
    files = list((tmp_path / "cap").glob("*.jsonl"))
    assert 2 <= len(files) <= 4 and sum(p.stat().st_size for p in files) <= 6144 + 2048
    assert rec.written == 201 and rec.dropped == 0


def test_the_panel_and_render_say_when_the_guard_ended_a_canary(tmp_path):
    from kit.render import guard_note
    from kit.widgets import RegistryPanel

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    assert guard_note(reg, "m") is None
    guard_stop(reg, "m", 2, reg.aliases("m").serial, {"detail": "canary 5xx rate 20.0% against production's 0.0%"})
    note = guard_note(reg, "m")
    assert note is not None and note.startswith("canary guard ended v2 at ") and "5xx rate 20.0%" in note
    panel = RegistryPanel(reg, "m")
    assert "canary guard ended v2" in panel.header.value
    set_traffic(reg, "m", 3, 0.2)  # a later move: the note is history, not news
    assert guard_note(reg, "m") is None


def test_progressive_steps_raise_a_healthy_canary_then_promote_through_the_gate(tmp_path):
    import dataclasses

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None), gated=(1, 2))  # v3 has no gate
    steps = dataclasses.replace(S, steps=(25.0, 50.0, 100.0), hold_s=0.0)
    (g,) = _guards(reg, 1, steps)

    def healthy_round() -> Any:
        g.tick()  # learn the key
        for _ in range(S.min_requests):
            g.observe(g._sides[0], 200, 0.002)  # production
            g.observe(g._sides[1], 200, 0.002)  # canary
        return g.tick()

    set_traffic(reg, "m", 2, 0.1)
    healthy_round()
    assert (reg.aliases("m").canary, reg.aliases("m").canary_weight) == (2, 0.25)
    healthy_round()
    assert reg.aliases("m").canary_weight == 0.5
    healthy_round()
    a = reg.aliases("m")
    assert (a.production, a.canary) == (2, None)
    events = [e["event"] for e in reg.history("m")]
    assert events[-3:] == ["canary_step", "canary_step", "promote"]
    assert reg.history("m")[-1]["why"].startswith("canary guard: healthy for 0.0s at 50%")
    # v3 climbs the steps too, but without a passing gate it is never promoted: it keeps its 50%
    set_traffic(reg, "m", 3, 0.3, force=True, why="try")
    for _ in range(3):
        healthy_round()
    a = reg.aliases("m")
    assert (a.production, a.canary, a.canary_weight) == (2, 3, 0.5)
    assert g.status()["last_decision"]["step"] == "refused" and "no passing gate" in g.status()["last_decision"]["error"]
    assert parse_guard_settings({"steps": [5, 25, 100]}, "x").steps == (5.0, 25.0, 100.0)
    with pytest.raises(ServiceError, match="increasing percentages"):
        parse_guard_settings({"steps": [50, 25]}, "x")


def test_generated_service_toml_turns_the_guard_on_and_capture_off(tmp_path):
    from kit.servicegen import render
    from kit.serving.config import load_service_config

    (tmp_path / "service.toml").write_text(render("s", "m", registry="reg")["service.toml"])
    cfg = load_service_config(tmp_path)
    assert cfg.canary_guard.enabled and cfg.canary_guard.steps == () and not cfg.capture.enabled
    text = render("s", "m", registry="reg", guard_steps=(5, 50, 100), guard_hold_s=30, capture=True,
                  capture_sample_rate=0.5, capture_drop_inputs=("ids",))["service.toml"]
    (tmp_path / "service.toml").write_text(text)
    cfg = load_service_config(tmp_path)
    assert cfg.canary_guard.steps == (5.0, 50.0, 100.0) and cfg.canary_guard.hold_s == 30.0
    assert (cfg.capture.enabled, cfg.capture.sample_rate, cfg.capture.drop_inputs) == (True, 0.5, ("ids",))
    (tmp_path / "service.toml").write_text('[service]\nname = "s"\n[model]\nname = "m"\nregistry = "r"\n')
    assert load_service_config(tmp_path).canary_guard is None  # services made before the guard: off


# ---------------------------------------------------------------------------- a registry writer without the key
# (issue 17, class 6): what they plant in the guard's folder is ignored and reported, never counted, never
# followed, and never switches the guard off. The same attacks against real gunicorn workers are in
# tests/e2e/test_canary_guard.py.


def _old_format(n: int, err: int, now: float) -> bytes:
    """What the guard wrote before its files were authenticated (and what an attacker can write): counts
    for both sides in seconds that stay 'inside the window' for a long time."""
    buckets = [{"side": side, "sec": int(now) + i, "n": n, "err": e, "hist": {"5": n}}
               for i in range(3) for side, e in (("production", 0), ("canary", err))]
    return json.dumps({"schema": 1, "worker": "evil-1", "updated": now, "buckets": buckets}).encode()


def _failing_round(g: CanaryGuard, now: float, n: int = 25) -> None:
    for _ in range(n):
        g.observe(1, 200, 0.001)
        g.observe(2, 500, 0.001)


def test_forged_copied_and_replayed_files_are_ignored_and_reported(tmp_path):
    import time

    from kit.serving import guard_files as gf
    from kit.signing import KeyStore

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    key = f"v2-s{reg.aliases('m').serial}"
    g0, g1 = _guards(reg)
    now = time.time()
    for g in (g0, g1):
        g.tick(now=now)
        for _ in range(5):
            g.observe(1, 200, 0.001)
            g.observe(2, 200, 0.001)
    g1.tick(now=now)  # g1's real, authenticated file
    folder = tmp_path / "reg" / "m" / "guard" / key
    real = (folder / "host-1.json").read_bytes()
    from kit.guard_key import window_mac_key

    foreign = window_mac_key(KeyStore(tmp_path / "keys").new())  # a key, but not this service's
    forged = {
        "evil-1.json": _old_format(1000, 1000, now),  # the old format: no MAC
        "evil-2.json": gf.encode(foreign, "m", key, "evil-2", 1, now, 1,
                                 {"production": [(int(now), 1000, 0, ((5, 1000),))],
                                  "canary": [(int(now), 1000, 1000, ((5, 1000),))]}),
        "host-7.json": real,  # g1's genuine file under another worker's name
    }
    for name, data in forged.items():
        (folder / name).write_bytes(data)
    (folder.parent / "v2-s999").mkdir()
    (folder.parent / "v2-s999" / "host-1.json").write_bytes(real)  # genuine, but for another serial
    assert g0.tick(now=now) is None and reg.aliases("m").canary == 2  # forged 100% errors: nothing ended
    assert g0.window["canary"].requests == 10 and g0.window["production"].requests == 10  # g0's 5 + g1's 5
    why = g0.status()["rejected_files"]
    assert set(why["now"]) == set(forged) and why["total"] == 3
    assert all(w.startswith("auth: ") for w in why["now"].values())
    # an older genuine file of g1 put back after a newer one was read: refused as a replay
    g1.observe(2, 200, 0.001)
    g1.tick(now=now)
    assert g0.tick(now=now) is None and g0.window["canary"].requests == 11
    (folder / "host-1.json").write_bytes(real)
    g0.tick(now=now)
    assert g0.window["canary"].requests == 5 and g0.status()["rejected_files"]["now"]["host-1.json"].startswith("replay")


def test_malformed_huge_and_odd_files_never_switch_the_guard_off(tmp_path):
    import os
    import time

    from kit.serving import guard_files as gf

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    key = f"v2-s{reg.aliases('m').serial}"
    (g,) = _guards(reg, 1)
    now = time.time()
    g.tick(now=now)
    folder = tmp_path / "reg" / "m" / "guard" / key
    folder.mkdir(parents=True)
    (folder / "bad-1.json").write_bytes(b'{"buckets": [{"side": "canary", "sec": 1e400, "n": "x"}]}')  # broke the old merge
    big = folder / "big-1.json"  # 79 MB of healthy-looking evidence in the old format
    one = json.dumps({"side": "canary", "sec": int(now) + 10, "n": 1, "err": 0, "hist": {"1": 1}}) + ","
    with open(big, "w") as f:
        f.write('{"buckets": [')
        f.write(one * (79_000_000 // len(one)))
        f.write(one[:-1] + "]}")
    assert big.stat().st_size > 78_000_000
    os.mkfifo(folder / "fifo-1.json")  # would block a plain open() forever
    os.symlink("/dev/zero", folder / "zero-1.json")  # endless bytes through a link
    (folder / "dir-1.json").mkdir()
    _failing_round(g, now)
    t0 = time.perf_counter()
    v = g.tick(now=now)
    took = time.perf_counter() - t0
    assert v is not None and v.reason == "errors" and reg.aliases("m").canary is None  # the guard still works
    assert g.window["canary"].requests == 25  # nothing of the planted files counted
    reasons = {n: w.split(":")[0] for n, w in g.status()["rejected_files"]["now"].items()}
    assert reasons == {"bad-1.json": "auth", "big-1.json": "size", "fifo-1.json": "type", "zero-1.json": "type",
                       "dir-1.json": "type"}
    assert took < 0.5, f"a tick took {took:.2f}s: the 79 MB file was read"  # the old guard parsed it: seconds
    # an authenticated file (the key holder's) that breaks the format is refused after the MAC, before use
    mac = g._mac_key
    assert mac is not None
    payload = json.dumps({"model": "m", "key": key, "worker": "h-2", "seq": 1, "updated": now, "slot_s": 1,
                          "sides": {"production": [[int(now), 5, 9, [[1, 5]]]], "canary": []}}).encode()
    with pytest.raises(gf.WindowFileRejected, match="malformed.*err"):
        gf.decode(mac, "m", key, "h-2", gf.HEADER + gf._mac(mac, "m", key, "h-2", payload).encode() + b"\n" + payload,
                  now)


def test_planted_links_are_never_written_through(tmp_path):
    import os
    import time

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    key = f"v2-s{reg.aliases('m').serial}"
    (g,) = _guards(reg, 1)
    now = time.time()
    g.tick(now=now)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "reg" / "m" / "guard").mkdir()
    os.symlink(outside, tmp_path / "reg" / "m" / "guard" / key)  # the key's folder is a link elsewhere
    _failing_round(g, now)
    v = g.tick(now=now)
    assert list(outside.iterdir()) == []  # nothing written there (the old guard wrote <host>-<pid>.json)
    assert g.status()["rejected_files"]["now"][f"guard/{key}"].startswith("folder: ")
    assert v is not None and reg.aliases("m").canary is None  # judged on its own counts

    set_traffic(reg, "m", 3, 0.5, force=True, why="test")
    key = f"v3-s{reg.aliases('m').serial}"
    target = outside / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "reg" / "m" / "guard" / key
    folder.mkdir()
    os.symlink(target, folder / f"{g.worker}.json")  # this worker's own file name is a link
    g.tick(now=now)
    for _ in range(3):
        g.observe(1, 200, 0.001)
    g.tick(now=now)
    assert target.read_text() == "keep me"  # the link was replaced by the worker's file, never followed
    assert not (folder / f"{g.worker}.json").is_symlink()


def test_dead_workers_files_are_swept(tmp_path):
    import os
    import time

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    key = f"v2-s{reg.aliases('m').serial}"
    g0, g1 = _guards(reg)
    now = time.time()
    for g in (g0, g1):
        g.tick(now=now)
        g.observe(1, 200, 0.001)
        g.tick(now=now)
    folder = tmp_path / "reg" / "m" / "guard" / key
    old = folder.parent / "v9-s3"  # a split that is over, left by workers that died
    old.mkdir()
    (old / "gone-12.json").write_bytes(b"x")
    (folder / ".gone-13.json.ab12.tmp").write_bytes(b"x")
    stale = now - 10 * S.window_s
    for p in (folder / "host-1.json", old / "gone-12.json", folder / ".gone-13.json.ab12.tmp"):
        os.utime(p, (stale, stale))  # host-1 died: its file has not changed for ten windows
    g0._swept = 0.0
    g0.tick(now=now)
    assert sorted(p.name for p in folder.iterdir()) == ["host-0.json"] and not old.exists()


def test_capture_files_are_private_and_the_cap_covers_every_worker_past_and_present(tmp_path: Path):
    """Issue 17, class 8: capture files were 0644, and max_bytes was per worker process, so a worker recycled by
    max_requests left files nobody rotated. Now: 0600 files in a 0700 folder, and a worker beginning a file makes
    room over the whole folder (its predecessors' files, open or closed, go oldest first)."""
    import os
    import time

    cap = tmp_path / "cap"
    cap.mkdir(mode=0o755)
    old = time.time() - 3600
    for i, name in enumerate(["m-host-101.000001.jsonl", "m-host-101.jsonl", "m-host-102.jsonl"]):
        (cap / name).write_bytes(b"x" * 3000)  # three dead predecessors' files: 9000 bytes, over the cap
        os.utime(cap / name, (old + i, old + i))
    (cap / "other-host-1.jsonl").write_bytes(b"y" * 5000)  # another model's: not ours to remove
    settings = CaptureSettings(enabled=True, sample_rate=1.0, max_file_bytes=2048, max_bytes=6144)
    rec = Recorder(settings, "m", cap)
    ids, x, out = torch.tensor([[3]]), torch.tensor([[0.5, 1.5]]), torch.tensor([[0.25, 0.75]])
    rec.record("r0", 1, 200, 0.002, _sig(), (ids, x), (out,))
    rec.flush()
    assert os.stat(cap).st_mode & 0o777 == 0o700
    ours = sorted(p.name for p in cap.glob("m-*.jsonl"))
    assert ours == ["m-host-102.jsonl", f"m-{rec.worker}.jsonl"]  # the two oldest went, the newest fits
    assert os.stat(cap / f"m-{rec.worker}.jsonl").st_mode & 0o777 == 0o600
    assert (cap / "other-host-1.jsonl").exists()
    for i in range(200):  # and while it writes, the folder stays inside the cap (one file's slack)
        rec.record(f"r{i}", 1, 200, 0.001, _sig(), (ids, x), (out,))
    rec.close()
    files = list(cap.glob("m-*.jsonl"))
    assert sum(p.stat().st_size for p in files) <= 6144 + 2048
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files if p.name.startswith(f"m-{rec.worker}"))


def test_a_worker_restarted_under_the_same_name_is_still_counted(tmp_path):
    """Containers restart with the same host name and pids: the restarted worker's first file must not look
    like a replay of its predecessor's (seq comes from the clock, so it still only goes forward)."""
    import time

    reg = three_versions(Registry(tmp_path / "reg", user="alice", keyring=None))
    set_traffic(reg, "m", 2, 0.5)
    g0, g1 = _guards(reg)
    now = time.time()
    for g in (g0, g1):
        g.tick(now=now)
    for _ in range(50):  # the predecessor wrote many files: a counter would be far ahead of a fresh one
        g1.observe(2, 200, 0.001)
        g1.tick(now=now)
    g0.tick(now=now)
    (again,) = _guards(reg, 1)
    again.worker = "host-1"
    again.tick(now=now + 1)
    again.observe(2, 200, 0.001)
    again.tick(now=now + 1)
    g0.tick(now=now + 1)
    assert g0.window["canary"].requests == 1 and not g0.status()["rejected_files"]["now"]
