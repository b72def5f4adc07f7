"""kit.config: defaults < kit.toml / [tool.kit] < KIT_* < explicit."""

from __future__ import annotations

import pytest

from kit.config import load_config
from kit.errors import ConfigError


def test_defaults_are_relative_to_the_project_root(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.kit]\n")
    sub = tmp_path / "notebooks"
    sub.mkdir()
    cfg = load_config(cwd=sub, environ={})
    assert cfg.project_root == tmp_path and cfg.registry == tmp_path / "registry"
    assert cfg.require_gate is True


def test_precedence(tmp_path):
    (tmp_path / "kit.toml").write_text('registry = "from-file"\nrequire_gate = false\n')
    assert load_config(cwd=tmp_path, environ={}).registry == tmp_path / "from-file"
    env = {"KIT_REGISTRY": "/srv/reg", "KIT_REQUIRE_GATE": "yes"}
    cfg = load_config(cwd=tmp_path, environ=env)
    assert str(cfg.registry) == "/srv/reg" and cfg.require_gate is True
    assert load_config(cwd=tmp_path, environ=env, registry=tmp_path / "x").registry == tmp_path / "x"


def test_bad_config_names_the_problem(tmp_path):
    (tmp_path / "kit.toml").write_text('registy = "typo"\n')
    with pytest.raises(ConfigError, match="registy"):
        load_config(cwd=tmp_path, environ={})
    (tmp_path / "kit.toml").write_text("registry = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(cwd=tmp_path, environ={})
    (tmp_path / "kit.toml").write_text("")
    with pytest.raises(ConfigError, match="require_gate must be true or false"):
        load_config(cwd=tmp_path, environ={"KIT_REQUIRE_GATE": "maybe"})
