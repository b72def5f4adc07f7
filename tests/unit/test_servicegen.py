"""kit.servicegen.generate and `kit service new` (no processes; gunicorn runs in tests/e2e)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from kit.cli import cli
from kit.errors import ServiceError
from kit.guard_key import GUARD_KEY_FILE
from kit.servicegen import FILES, app_target, generate


@pytest.fixture
def registered(registry):
    """``demo-digits@1``: the demo's network untrained (nothing here reads its accuracy; no training in unit)."""
    from kit.demo import DigitsMLP

    torch.manual_seed(0)
    return registry, registry.register("demo-digits", DigitsMLP().eval(), torch.randn(1, 64))


def test_generate_is_deterministic_and_refuses_overwrite(registered, tmp_path):
    reg, mv = registered
    d = generate("demo", mv.name, registry=reg.root, out_dir=tmp_path / "services")
    assert sorted(p.name for p in d.iterdir()) == sorted((*FILES, GUARD_KEY_FILE))
    assert (d / GUARD_KEY_FILE).stat().st_mode & 0o777 == 0o600  # the canary guard's credential
    first = {f: (d / f).read_bytes() for f in (*FILES, GUARD_KEY_FILE)}
    with pytest.raises(ServiceError, match="already exists"):
        generate("demo", mv.name, registry=reg.root, out_dir=tmp_path / "services")
    generate("demo", mv.name, registry=reg.root, out_dir=tmp_path / "services", force=True)
    assert {f: (d / f).read_bytes() for f in (*FILES, GUARD_KEY_FILE)} == first  # the guard key is kept
    assert 'registry = "../../registry"' in first["service.toml"].decode()
    with pytest.raises(ServiceError, match="has no model 'nope'"):
        generate("x", "nope", registry=reg.root, out_dir=tmp_path / "services")


def test_cli_service_new_goes_where_kit_toml_says(registered, tmp_path, monkeypatch):
    """The CLI and %deploy agree: kit.toml's `services` folder, not ./services, when --out-dir is not given."""
    reg, mv = registered
    project = tmp_path / "project"
    project.mkdir()
    (project / "kit.toml").write_text('services = "deploy/services"\n')
    monkeypatch.chdir(project)
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "service", "new", "web", "--model", mv.name])
    assert r.exit_code == 0, r.output
    assert (project / "deploy" / "services" / "web" / "service.toml").is_file()
    assert not (project / "services").exists()


def test_cli_service_new(registered, tmp_path):
    reg, mv = registered
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "service", "new", "web", "--model", mv.name,
                                 "--out-dir", str(tmp_path), "--api-key", "k1", "--workers", "2"])
    assert r.exit_code == 0, r.output
    toml = (tmp_path / "web" / "service.toml").read_text()
    assert "workers = 2" in toml and "k1" not in toml  # only the hash is stored
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "service", "new", "web", "--model", mv.name,
                                 "--out-dir", str(tmp_path)])
    assert r.exit_code == 2 and "kit: error:" in r.output and "--force" in r.output


def test_cli_service_new_backend(registered, tmp_path):
    reg, mv = registered
    base = ["--registry", str(reg.root), "service", "new", "web", "--model", mv.name, "--out-dir", str(tmp_path)]
    r = CliRunner().invoke(cli, [*base, "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert 'backend = "onnxruntime"' in (tmp_path / "web" / "service.toml").read_text()
    assert "no production version yet" in r.output and "--backend onnxruntime" in r.output
    reg.promote(mv.name, mv.version, force=True, why="test")
    r = CliRunner().invoke(cli, [*base, "--force", "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert f"kit validate {mv.ref} --backend onnxruntime" in r.output  # no gate ran on that backend yet
    r = CliRunner().invoke(cli, [*base, "--force", "--backend", "tensorrt"])
    assert r.exit_code == 2 and "onnxruntime" in r.output and "torch" in r.output



def test_generation_writes_app_py_and_regenerating_an_old_layout_drops_its_wsgi_py(registered, tmp_path, caplog):
    """The ASGI app lives in app.py (gunicorn's target app:app); a folder an older Kit generated (wsgi.py,
    no app.py) is served as wsgi:app, and regenerating it removes Kit's old wsgi.py but not someone else's."""
    reg, mv = registered
    d = generate("demo", mv.name, registry=reg.root, out_dir=tmp_path / "services")
    assert (d / "app.py").is_file() and not (d / "wsgi.py").exists()
    assert app_target(d) == "app:app"
    for f in ("start.sh", "gunicorn.conf.py", "README.md"):
        text = (d / f).read_text()
        assert "app:app" in text and "wsgi:app" not in text, f
    (d / "app.py").rename(d / "wsgi.py")  # the layout of an older Kit
    assert app_target(d) == "wsgi:app"
    generate("demo", mv.name, registry=reg.root, out_dir=tmp_path / "services", force=True)
    assert (d / "app.py").is_file() and not (d / "wsgi.py").exists() and app_target(d) == "app:app"
    (d / "wsgi.py").write_text("app = 'mine'\n")  # not Kit's: kept, with a warning
    generate("demo", mv.name, registry=reg.root, out_dir=tmp_path / "services", force=True)
    assert (d / "wsgi.py").read_text() == "app = 'mine'\n" and app_target(d) == "app:app"
    assert "was not written by Kit and is left in place" in caplog.text
