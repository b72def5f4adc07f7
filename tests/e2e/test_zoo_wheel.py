"""The real-model zoo from Kit's installed wheel: a fresh venv (tests/fixtures/kit_wheel.py), a project folder
holding the researcher's own model code (torchvision's MobileNetV3-Small and ConvNeXt definitions, copied
from tests/zoo/), and ``kit.deploy.deploy`` (what ``%deploy`` runs) with the default gate and no --force:
capture, register, gate, promote, generate a service; then each service under the venv's gunicorn answers
/predict equal to eager, and a second version of one model is gated against the first.

Two models only (the rest of the zoo runs from the checkout in tests/e2e/test_zoo_real.py): the venv
holds kit[notebook]'s closure, which has no transformers (so the language models are not tried here) and
no ONNX toolchain (the [onnx] extra: capture records that it is not installed, and the torch backend serves).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import kit_wheel  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SCRIPT = '''
import json, sys
import torch
import kit
from kit.config import load_config
from kit.deploy import deploy
from kit.registry import Registry
from zoo.tv_cnn import mobilenet_v3_small
from zoo.tv_vit import convnext_atto

reg = Registry.from_config(load_config())
params = {"batch_n": 8, "latency_repeats": 10}  # the default notebook and thresholds; fewer rows and calls
report = {"kit": kit.__file__, "models": {}}
for name, build, size, versions in (("mobilenet", mobilenet_v3_small, 96, 1), ("convnext", convnext_atto, 64, 2)):
    for v in range(versions):
        torch.manual_seed(0)
        model = build().eval()
        if v:  # a second version: the head's bias moved a little, judged against the first as production
            with torch.no_grad():
                model.classifier[-1].bias.add_(1e-3)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        r = deploy(reg, model, {"x": x}, name, params=params, promote=True, service=name)
        probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = model(probe)
        report["models"][name] = {"ref": r.ref, "passed": r.gate.passed, "baseline": r.gate.baseline["version"],
                                  "steps": {s.name: round(s.seconds, 1) for s in r.steps},
                                  "onnx": r.version.capture["onnx"]["exported"],
                                  "onnx_reason": r.version.capture["onnx"].get("reason", ""), "service": str(r.service_dir),
                                  "probe": probe.tolist(), "want": want.tolist()}
print(json.dumps(report))
'''


def test_the_wheel_deploys_real_architectures_with_the_default_gate(tmp_path, repo_root):
    wheel = kit_wheel.cached_wheel(repo_root)
    venv = tmp_path / "venv"
    python = kit_wheel.fresh_venv(wheel, venv)
    project = tmp_path / "project"
    (project / "zoo").mkdir(parents=True)
    for f in ("tv_ops.py", "tv_cnn.py", "tv_vit.py"):  # the researcher's model code, beside the notebook
        shutil.copy(repo_root / "tests" / "zoo" / f, project / "zoo" / f)
    (project / "zoo" / "__init__.py").write_text("")
    (project / "kit.toml").write_text('registry = "registry"\n')
    (project / "deploy_zoo.py").write_text(SCRIPT)
    env = kit_wheel.clean_env(venv, KIT_KEYS_DIR=str(tmp_path / "keys"), HOME=str(tmp_path / "home"),
                              KIT_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([str(python), "deploy_zoo.py"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=1100)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(report["kit"]).is_relative_to(venv), report["kit"]  # the wheel's kit, not this checkout
    models = report["models"]
    assert models["mobilenet"]["ref"] == "mobilenet@1" and models["mobilenet"]["baseline"] is None
    assert models["convnext"]["ref"] == "convnext@2" and models["convnext"]["baseline"] == 1  # against v1
    from kit.servicegen import start_service

    for name, m in models.items():
        assert m["passed"], m["steps"]
        # kit[notebook] alone has no ONNX toolchain (the [onnx] extra): capture says so and the torch backend serves
        assert not m["onnx"] and "onnxruntime" in m["onnx_reason"] and "not installed" in m["onnx_reason"], m
        with start_service(Path(m["service"]), env=env, python=str(python), timeout=240) as running:
            body = json.dumps({"inputs": {"x": m["probe"]}}).encode()
            req = urllib.request.Request(running.url + "/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.load(r)
        assert reply["model_version"] == int(m["ref"].split("@")[1])
        got, want = reply["outputs"], m["want"]
        assert max(abs(a - b) for ra, rb in zip(got, want) for a, b in zip(ra, rb)) < 1e-4, name
    print("from the wheel, seconds per step:", json.dumps({n: m["steps"] for n, m in models.items()}))
