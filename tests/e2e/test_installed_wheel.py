"""Installed, not cloned: kit's wheel in its own venv, used from an empty folder, on a model with two inputs.

The whole path a researcher takes in their own project: ``kit init`` -> capture and register (a text
classifier: int64 token ids + a float mask, dynamic sequence length) -> the default gate (the notebook
``kit init`` copied out of the installed package) -> promote -> a generated service under gunicorn ->
an HTTP request -> ``kit pack``. Every command is the venv's own ``kit``/``python``; nothing reads this
checkout (the test asserts kit is imported from the venv). See tests/fixtures/kit_wheel.py for how the
venv gets torch and Jupyter without a download.

The venv is built once per content of kit's wheel (``kit_wheel.shared_venv``: a fresh venv, kept in .cache/
while kit's source is unchanged), and so is its packed environment layer (.cache/pack-layers-wheel, keyed by
kit pack by a stat of every shipped file): building the venv (~6 s), compiling the bytecode of torch, onnx
and Jupyter in its first run (~8 CPU-s) and compressing ~770 MB (~8 CPU-s) are paid once per change of kit,
not every run. The project folder is new every run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import kit_wheel  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL_SCRIPT = '''
import json, sys
import numpy as np, torch
from torch import nn
import kit
from kit.config import load_config
from kit.registry import Registry

class TextClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 4)
    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0))

torch.manual_seed(0)
model = TextClassifier().eval()
ids = torch.randint(1, 100, (8, 12))
mask = torch.ones(8, 12)
mask[:, 9:] = 0
reg = Registry.from_config(load_config())
mv = reg.register("textclf", model, (ids, mask), dynamic={"ids": {1: "seq"}, "mask": {1: "seq"}},
                  dims={"seq": (2, 128)}, metrics={"note": "wheel test"})
# held-out rows for the gate's quality check: arrays named like the inputs, plus labels
x_ids, x_mask = torch.randint(1, 100, (40, 12)), torch.ones(40, 12)
with torch.no_grad():
    labels = model(x_ids, x_mask).argmax(1).numpy()
np.savez("heldout.npz", ids=x_ids.numpy(), mask=x_mask.numpy(), labels=labels)
with torch.no_grad():
    probe = model(ids[:2, :5], mask[:2, :5]).tolist()
print(json.dumps({"ref": mv.ref, "kit": kit.__file__, "signature": mv.signature, "probe": probe,
                  "ids": ids[:2, :5].tolist(), "mask": mask[:2, :5].tolist()}))
'''


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300, ok: bool = True):
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    res.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    if ok:
        assert res.returncode == 0, f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_the_wheel_takes_a_two_input_model_from_an_empty_folder_to_a_packed_service(tmp_path, repo_root):
    times: dict[str, float] = {}
    t = time.monotonic()
    wheel = kit_wheel.cached_wheel(repo_root)
    times["wheel"] = time.monotonic() - t
    with __import__("zipfile").ZipFile(wheel) as z:
        names = z.namelist()
    assert "kit/notebooks/validation/default.ipynb" in names and "kit/templates/service/app.py.j2" in names

    t = time.monotonic()
    python = kit_wheel.shared_venv(repo_root, ("notebook",))
    venv = python.parent.parent
    times["venv"] = time.monotonic() - t
    project = tmp_path / "project"
    project.mkdir()
    env = kit_wheel.clean_env(venv, KIT_KEYS_DIR=str(tmp_path / "keys"), HOME=str(tmp_path / "home"))
    kit = str(venv / "bin" / "kit")

    # kit init in an empty folder (no environment declaration yet: a warning, not an error)
    r = _run([kit, "init"], project, env)
    assert "wrote kit.toml" in r.stdout and "wrote notebooks/validation/default.ipynb" in r.stdout
    assert "no environment declaration" in r.stderr
    (project / "environment.yml").write_text("dependencies:\n  - python=3.11\n  - pip:\n    - kit[notebook]\n")
    r = _run([kit, "init"], project, env)
    assert "kept kit.toml" in r.stdout and "warning" not in r.stderr

    # %load_ext kit works in the installed package (the magics a notebook uses)
    r = _run([str(python), "-c", "from IPython.core.interactiveshell import InteractiveShell as S; ip = S.instance(); "
              "ip.run_line_magic('load_ext', 'kit'); print(sorted(m for m in ip.magics_manager.magics['line'] "
              "if m in ('deploy', 'models', 'promote', 'registry')))"], project, env)
    assert r.stdout.strip().splitlines()[-1] == "['deploy', 'models', 'promote', 'registry']", r.stdout

    # capture and register the two-input model (kit imported from the venv, not from this checkout)
    r = _run([str(python), "-c", MODEL_SCRIPT], project, env)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    times["capture+register"] = r.seconds
    assert info["ref"] == "textclf@1" and Path(info["kit"]).is_relative_to(venv), info["kit"]
    assert [s["name"] for s in info["signature"]["inputs"]] == ["ids", "mask"]

    # the default gate: the notebook kit init copied out of the installed package, with data
    r = _run([kit, "validate", "textclf@1", "-p", "data=heldout.npz",  # relative: read in the project
              "-p", "max_p95_ms_batch1=1000", "-p", "max_p95_ms_batch_n=5000"], project, env, timeout=400, ok=False)
    times["gate"] = r.seconds
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for check in ("parity on the stored example", "deterministic on repeat", "dynamic dim seq",
                  "wrong shape is refused", "accuracy"):
        assert f"PASS    {check}" in r.stdout, r.stdout
    assert "gate PASSED: textclf@1" in r.stdout
    report = Path(r.stdout.split("report: ")[-1].strip()).read_text()
    assert "report rendering failed" not in report and "jp-Notebook" in report  # nbconvert's lab template

    _run([kit, "promote", "textclf@1"], project, env)
    r = _run([kit, "service", "new", "textsvc", "--model", "textclf", "--workers", "1"], project, env)
    svc = project / "services" / "textsvc"
    assert (svc / "app.py").is_file() and not (svc / "wsgi.py").exists()

    # serve it with the venv's gunicorn and ask over HTTP, with both inputs by name
    from kit.servicegen import start_service

    t = time.monotonic()
    with start_service(svc, env=env, python=str(python), timeout=120) as running:
        times["service ready"] = time.monotonic() - t
        body = json.dumps({"inputs": {"ids": info["ids"], "mask": info["mask"]}}).encode()
        req = urllib.request.Request(running.url + "/predict", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            reply = json.load(resp)
    assert reply["model_version"] == 1
    got = reply["outputs"]
    assert len(got) == 2 and all(abs(a - b) < 1e-4 for ra, rb in zip(got, info["probe"]) for a, b in zip(ra, rb))

    # pack it: the venv (kit installed from its wheel, so nothing editable), the service, the model. kit pack
    # keeps the environment layer beside the archive (dist/.layers): there, this test's own cache, so a run
    # whose venv (and so kit) is unchanged re-packs the layer it wrote before (kit keeps 3 layers there)
    layers = repo_root / ".cache" / "pack-layers-wheel"
    layers.mkdir(parents=True, exist_ok=True)
    (project / "dist").mkdir()
    (project / "dist" / ".layers").symlink_to(layers, target_is_directory=True)
    r = _run([kit, "pack", str(svc), "--out", str(project / "dist"), "--compress-level", "1", "--json"],
             project, env, timeout=600)
    times["pack"] = r.seconds
    out = json.loads(r.stdout)["pack"]
    archive = Path(out["archive"])
    assert archive.is_file() and archive.parent == project / "dist"
    assert out["kind"] == "venv" and out["models"] == {"textclf": [1]} and out["service"] == "textsvc"
    shutil.rmtree(project / "dist")  # ~250 MB of archive (the link to the layers goes, not them); pytest keeps
    # three runs' tmp dirs
    print("installed-wheel path, seconds:", json.dumps({k: round(v, 1) for k, v in times.items()}))
