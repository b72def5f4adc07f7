"""service.toml's one declaration (kit.service_settings): the generated file, the loaded config and the checks
all come from it, so they cannot drift apart (no processes)."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from kit import service_settings as settings
from kit.errors import PackError, ServiceError
from kit.pack.stage import read_service
from kit.servicegen import render
from kit.serving.config import JwtSettings, ServiceConfig, load_service_config
from kit.serving.guard import GuardSettings
from kit.serving.recorder import CaptureSettings


def _write(tmp_path, text):
    (tmp_path / "service.toml").write_text(text)
    return tmp_path


def test_the_generated_file_holds_every_declared_setting_with_its_default():
    text = render("svc", "m", registry="../reg")["service.toml"]
    doc = tomllib.loads(text)
    for s in settings.SETTINGS:
        table = doc["auth"]["jwt"] if s.section == "auth.jwt" else doc[s.section]
        if not s.generated:
            assert s.key not in table
            continue
        want = {"name": "svc", "model": "m", "registry": "../reg"}.get(s.option, s.default)
        got = table[s.key]
        assert (tuple(got) if isinstance(got, list) else got) == want, s
    assert text == render("svc", "m", registry="../reg")["service.toml"]  # same inputs, same bytes


def test_loaded_defaults_are_the_declared_ones(tmp_path):
    cfg = load_service_config(_write(tmp_path, render("svc", "m", registry="r")["service.toml"]))
    plain = {s.option: s.default for s in settings.SETTINGS
             if s.section not in ("auth.jwt", "canary_guard", "capture", "trust") and s.default is not settings.REQUIRED
             and s.option != "keys_file"}
    for option, default in plain.items():
        assert getattr(cfg, option) == default, option
        assert getattr(ServiceConfig("n", "m", tmp_path), option) == default, option
    guard = {s.key: s.default for s in settings.SETTINGS if s.section == "canary_guard"}
    assert dataclasses.asdict(cfg.canary_guard) == {**guard, "steps": ()}
    assert GuardSettings().enabled is False and CaptureSettings().enabled is False  # absent section: off
    capture = {s.key: s.default for s in settings.SETTINGS if s.section == "capture"}
    assert dataclasses.asdict(cfg.capture) == capture
    jwt = {s.key: s.default for s in settings.SETTINGS if s.section == "auth.jwt" and s.key in
           ("algorithms", "leeway", "client_claim", "required_claims")}
    assert {k: getattr(JwtSettings(), k) for k in jwt} == jwt


@pytest.mark.parametrize("line, message", [
    ("workers = -1", "[service] workers = -1 must be >= 0"),
    ("max_batch = 0", "[batching] max_batch = 0 must be >= 1"),
    ('engine = "flask"', 'must be "asgi"'),
    ("poll_interval = true", "must be a float"),
    ("timeout = 1.5", "must be a int"),
    ("colour = 1", "unknown key 'colour'"),
])
def test_one_rule_per_setting_refuses_with_the_file_named(tmp_path, line, message):
    base = render("svc", "m", registry="r")["service.toml"]
    section = {"workers": "[service]", "engine": "[service]", "timeout": "[service]", "colour": "[service]",
               "max_batch": "[batching]", "poll_interval": "[reload]"}[line.split()[0]]
    key = line.split()[0]
    lines = [ln for ln in base.splitlines() if not ln.startswith(f"{key} =")]
    text = "\n".join(lines).replace(section, f"{section}\n{line}", 1) + "\n"
    d = _write(tmp_path, text)
    with pytest.raises(ServiceError, match=re.escape(message)) as exc:
        load_service_config(d)
    assert str(d / "service.toml") in str(exc.value)


def test_pack_reads_through_the_same_reader(tmp_path):
    d = _write(tmp_path, render("svc", "m", registry="reg")["service.toml"])
    info = read_service(d)
    assert (info.name, info.model, info.registry) == ("svc", "m", (d / "reg").resolve())
    _write(tmp_path, (d / "service.toml").read_text().replace("[limits]", "[limits]\nmax_bodybytes = 1"))
    with pytest.raises(PackError, match="unknown key 'max_bodybytes' in \\[limits\\]"):
        read_service(d)


def test_generate_options_are_checked_against_the_declaration():
    with pytest.raises(ServiceError, match="workers"):
        render("svc", "m", registry="r", workers="many")
    with pytest.raises(ServiceError, match="Unknown service option"):
        render("svc", "m", registry="r", capture_queue_size=5)  # read when present, never generated
    text = render("svc", "m", registry="r", guard_steps=[5, 50, 100], jwt_audience="svc", jwt=True)["service.toml"]
    doc = tomllib.loads(text)
    assert doc["canary_guard"]["steps"] == [5.0, 50.0, 100.0] and doc["auth"]["jwt"]["audience"] == ["svc"]
    assert doc["auth"]["jwt"]["secret_env"] == "KIT_JWT_SECRET"


def test_the_removed_engines_keys_are_read_ignored_and_logged(tmp_path, caplog):
    """engine and threads (the gthread + Flask engine) are no longer written; an older file that has them
    still loads, with one deprecation line each, and generate() takes them as no-ops the same way."""
    base = render("svc", "m", registry="r")["service.toml"]
    assert "engine =" not in base and "threads =" not in base.replace("torch_threads =", "")
    d = _write(tmp_path, base.replace("[service]", '[service]\nengine = "asgi"\nthreads = 4', 1))
    with caplog.at_level("WARNING", logger="kit.service_settings"):
        cfg = load_service_config(d)
    said = [r.getMessage() for r in caplog.records]
    assert any("[service] engine is no longer read" in m for m in said), said
    assert any("[service] threads is no longer read" in m and "remove it" in m for m in said), said
    assert cfg.name == "svc" and "threads" not in {f.name for f in dataclasses.fields(cfg)}
    caplog.clear()
    with caplog.at_level("WARNING", logger="kit.service_settings"):
        assert render("svc", "m", registry="r", engine="asgi", threads=8)["service.toml"] == base
    assert len(caplog.records) == 2
    with pytest.raises(ServiceError, match='engine = .flask. must be "asgi"'):
        render("svc", "m", registry="r", engine="flask")
