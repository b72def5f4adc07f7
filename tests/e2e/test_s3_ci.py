"""`kit init --ci github|gitlab` and the pipeline's steps run for real: the pipelines both run
``ci/kit-gate.sh``, so the test runs exactly that script, with the variables CI would set, against a bucket on
a real S3 server (SeaweedFS): the CI's own key gates the developer's version (papermill kernel), report.html
is kept, and the version is promoted only when the gate passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from kit.registry import Registry
from kit.signing import Keyring

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KIT = str(Path(sys.executable).parent / "kit")
MODEL = "ci-model"


def _init(root: Path, ci: str) -> list[str]:
    root.mkdir()
    res = subprocess.run([KIT, "init", str(root), "--ci", ci, "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [str(Path(p).relative_to(root.resolve())) for p in json.loads(res.stdout)["written"]]


def test_init_writes_pipelines_that_run_the_one_script(tmp_path: Path):
    gh = _init(tmp_path / "gh", "github")
    assert {"ci/kit-gate.sh", ".github/workflows/kit-gate.yml"} <= set(gh)
    wf = yaml.safe_load((tmp_path / "gh" / ".github/workflows/kit-gate.yml").read_text())
    steps = wf["jobs"]["gate"]["steps"]
    assert [s.get("run") for s in steps if s.get("run", "").startswith("sh ")] == ["sh ci/kit-gate.sh"]
    upload = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload and upload[0]["with"]["path"] == "kit-gate/" and upload[0]["if"] == "always()"
    assert wf["jobs"]["gate"]["env"]["KIT_CI_SIGNING_KEY"] == "${{ secrets.KIT_CI_SIGNING_KEY }}"

    gl = _init(tmp_path / "gl", "gitlab")
    assert {"ci/kit-gate.sh", ".gitlab-ci.yml"} <= set(gl)
    job = yaml.safe_load((tmp_path / "gl" / ".gitlab-ci.yml").read_text())["kit-gate"]
    assert job["script"][-1] == "sh ci/kit-gate.sh" and job["artifacts"] == {"when": "always", "paths": ["kit-gate/"]}
    again = subprocess.run([KIT, "init", str(tmp_path / "gl"), "--ci", "gitlab"], capture_output=True, text=True)
    assert again.returncode == 0 and "kept" in again.stdout  # never overwritten


def test_the_pipeline_script_gates_keeps_the_report_and_promotes_only_on_a_pass(
        s3_server, s3_env, tmp_path: Path):
    url = f"s3://kit-test/ci-{uuid.uuid4().hex[:8]}"
    proj = tmp_path / "proj"
    _init(proj, "github")
    dev = Keyring(tmp_path / "dev-keys")
    reg = Registry(url, keyring=dev, user="dev", cache_dir=tmp_path / "dev-cache")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    reg.register(MODEL, model, (torch.rand(2, 8),))
    ci_key = Keyring(tmp_path / "ci-keys").signer()
    pem = (tmp_path / "ci-keys" / f"{ci_key.key_id}.pem").read_text()
    env = {**os.environ, **s3_server.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "KIT_REGISTRY": url, "KIT_GATE_MODEL": MODEL, "KIT_CI_SIGNING_KEY": pem,
           "KIT_TRUSTED_KEYS": dev.signer().public.text(), "KIT_KEYS_DIR": str(tmp_path / "ci-runner-keys"),
           "KIT_CACHE_DIR": str(tmp_path / "ci-cache"), "KIT_USER": "ci", "GITHUB_SHA": "abc123"}

    run = subprocess.run(["sh", "ci/kit-gate.sh"], cwd=proj, env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (proj / "kit-gate" / "report.html").stat().st_size > 1000
    reader = Registry(url, keyring=Keyring.verify_only(Keyring(tmp_path / "ci-keys").trust()),
                      cache_dir=tmp_path / "reader")
    a = reader.aliases(MODEL)
    assert a.production == 1 and a.signed_by == ci_key.key_id
    assert not list((tmp_path / "ci-runner-keys").glob("*.pem"))  # the CI used its own key, made no other

    # a version whose gate fails is not promoted: the project's validation notebook is made to fail
    reg.register(MODEL, model, (torch.rand(2, 8),), metrics={"round": 2})
    nb_path = next((proj / "notebooks" / "validation").glob("*.ipynb"))
    nb = json.loads(nb_path.read_text())
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                        "source": ["raise AssertionError('this version is not good enough')"]})
    nb_path.write_text(json.dumps(nb))
    (proj / "kit-gate" / "report.html").unlink()
    failed = subprocess.run(["sh", "ci/kit-gate.sh"], cwd=proj, env=env, capture_output=True, text=True, timeout=500)
    assert failed.returncode == 1 and "nothing promoted" in failed.stderr, failed.stderr[-3000:]
    verdict = json.loads((proj / "kit-gate" / "gate.json").read_text())
    assert (verdict["version"], verdict["passed"]) == (2, False)
    assert (proj / "kit-gate" / "report.html").is_file()  # a failed gate's report is kept too
    assert reader.aliases(MODEL).production == 1
    assert "conditional create  OK" in (proj / "kit-gate" / "registry-check.txt").read_text()

    # a runner whose credentials cannot use the bucket stops at the access check, naming what it lacks
    denied = subprocess.run(["sh", "ci/kit-gate.sh"], cwd=proj, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"},
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode == 2 and "cannot write" in denied.stderr and "s3:ListBucket" in denied.stderr, \
        denied.stderr[-3000:]
