"""kit.pack.image: the Containerfile a pack gets, image tags, and what happens without a builder."""

from __future__ import annotations

import json

import pytest

from kit.errors import PackError
from kit.pack.image import APP_UID, DEFAULT_BASE, containerfile_text, image_tag

CONDA = {"root": "demo-v3-linux-x86_64", "service": "demo", "label": "v3", "platform": "linux-x86_64",
         "kind": "conda", "python": "3.11.7", "base_interpreter": None}


def test_containerfile_for_a_conda_pack():
    text = containerfile_text(CONDA, 8123)
    lines = text.splitlines()
    assert f"ARG BASE={DEFAULT_BASE}" in lines and "FROM ${BASE}" in lines
    assert f"COPY --chown={APP_UID}:{APP_UID} demo-v3-linux-x86_64/ /opt/kit/demo-v3-linux-x86_64/" in lines
    assert f"USER {APP_UID}:{APP_UID}" in lines and "EXPOSE 8123/tcp" in lines
    assert "ENV KIT_BIND=0.0.0.0:8123 PYTHONDONTWRITEBYTECODE=1 KIT_STATE_DIR=/tmp/kit-state KIT_CACHE_DIR=/tmp/kit-cache" in lines
    assert 'ENTRYPOINT ["/opt/kit/demo-v3-linux-x86_64/run.sh"]' in lines and 'CMD ["start"]' in lines
    health = next(line for line in lines if line.startswith("HEALTHCHECK"))
    cmd = json.loads(health.split(" CMD ", 1)[1])
    assert cmd[0] == "/opt/kit/demo-v3-linux-x86_64/env/bin/python" and "127.0.0.1:8123/readyz" in cmd[2]
    assert not any(line.startswith("RUN") for line in lines)  # building needs no container runtime
    assert "ARG BASE=registry.example/base:1" in containerfile_text(CONDA, 80, base="registry.example/base:1")


def test_containerfile_for_a_venv_pack_names_the_interpreter_it_needs():
    venv = {**CONDA, "kind": "venv", "base_interpreter": "/opt/py/3.11.7/bin/python3.11"}
    text = containerfile_text(venv, 8000)
    assert "ARG BASE=\n" in text and "Python 3.11.7 at /opt/py/3.11.7/bin/python3.11" in text


def test_containerfile_refuses_a_strange_root():
    with pytest.raises(PackError, match="plain folder name"):
        containerfile_text({**CONDA, "root": "../etc"}, 80)


def test_image_tag():
    assert image_tag("Demo_Svc", "v3") == "localhost/kit-demo_svc:v3"
    assert image_tag("x", "1+local/dirty") == "localhost/kit-x:1-local-dirty"
