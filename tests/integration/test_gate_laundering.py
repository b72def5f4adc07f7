"""Gate laundering (issue 17, class 5): someone who can write the registry's files, without a key, tries to
turn a failing gate into a signed pass while it runs.

Real papermill, a real kernel of this interpreter, a real attacker process. The attacker walks the
registry in a tight loop and rewrites every records file (``*.checks.jsonl``) it finds so that each failed
check reads as passed, and every ``result.json`` likewise. Before the fix the records lived in the
registry's run folder while the kernel wrote them and were read back from there: the attacker's edit
became a result signed with the project's key, and ``promote`` accepted it without force.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from kit import gate
from kit.errors import PromotionRefusedError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Jupyter is migrating its paths:DeprecationWarning"),
]

# The attacker: no kit import, no key; only the registry folder. It logs every records file it saw
# (and when), so the test can tell where the gate kept its records during the run.
ATTACKER = r"""
import json, os, sys, time
root, log, stop = sys.argv[1], sys.argv[2], sys.argv[3]
seen = {}
def flip(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return
    forged = text.replace('"passed": false', '"passed": true')
    if forged != text:  # whole file at once (a reader never sees it torn), only when there is a fail to flip
        tmp = path + ".attacker"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(forged)
        os.replace(tmp, path)
while not os.path.exists(stop):
    for d, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".checks.jsonl") or name == "result.json":  # records and verdicts
                p = os.path.join(d, name)
                seen.setdefault(p, time.time())
                flip(p)
    time.sleep(0.002)
with open(log, "w") as f:
    json.dump(seen, f)
"""


def _failing_notebook(path: Path) -> Path:
    """A notebook that loads the gated version, records one failing check, then lingers 2 s (the attacker's
    window: every record is written by then)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('registry = ""\nmodel_name = ""\nversion = 0', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from kit import gate\nfrom kit.registry import Registry\n"
            "mv = Registry(registry).get(model_name, version)\n"
            "gate.artifact(mv)\n"
            'gate.check("accuracy", False, value=0.12, threshold=0.9, detail="the model is bad")'),
        nbformat.v4.new_code_cell("import time\ntime.sleep(2.0)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_rewriting_records_during_the_run_cannot_launder_a_failing_gate(tmp_path, registered):
    reg, mv = registered
    nb = _failing_notebook(tmp_path / "bad_model.ipynb")
    seen_log, stop = tmp_path / "attacker-seen.json", tmp_path / "attacker-stop"
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, str(reg.root), str(seen_log), str(stop)])
    try:
        t0 = time.time()
        result = gate.run_gate(reg, mv.name, mv.version, notebooks=[nb], timeout=120)
        t1 = time.time()
        time.sleep(0.3)  # the attacker also works on what the gate published
    finally:
        stop.touch()
        attacker.wait(timeout=30)
    seen = json.loads(seen_log.read_text())

    # The verdict is the notebook's, whatever the attacker wrote.
    assert result.passed is False
    assert [c.passed for c in result.checks] == [False]
    assert "check(s) failed: accuracy = 0.12 (threshold 0.9)" in (result.error or "")
    # No records file was under the registry while the gate ran (the kernel wrote them in a private folder);
    # the copy published at the end is the only one the attacker saw, and only after the verdict.
    records = [p for p in seen if p.endswith(".checks.jsonl")]
    assert records == [str(result.run_dir / "bad_model.checks.jsonl")], seen
    assert all(seen[p] >= t1 - 1.0 for p in records), (t0, t1, seen)  # copied with the result, at the end
    # What the gate signed is a fail; the attacker's edit of result.json breaks its signature: no gate.
    assert reg.passing_gate(mv) is None
    assert reg.gate_verdict(mv)[0] in ("failed", "unsigned")
    with pytest.raises(PromotionRefusedError):
        reg.promote(mv.name, mv.version)
    assert reg.aliases(mv.name).production is None


def test_the_signed_result_binds_the_published_evidence(tmp_path, registered):
    """result.json names the sha256 of every file the gate published beside it, and is signed over the very
    bytes written: an edited report or executed notebook is detectable against the signed result."""
    import hashlib

    from kit.signing import sig_path, verify_file

    reg, mv = registered
    nb = _failing_notebook(tmp_path / "bad_model.ipynb")
    result = gate.run_gate(reg, mv.name, mv.version, notebooks=[nb], timeout=120)
    path = result.run_dir / "result.json"
    verify_file(path, reg.trust(), "result", "")  # raises if the signature is not over these bytes
    files = json.loads(path.read_bytes())["files"]
    assert set(files) == {"bad_model.ipynb", "bad_model.checks.jsonl", "bad_model.kernel.log", "report.html"}
    for name, digest in files.items():
        assert hashlib.sha256((result.run_dir / name).read_bytes()).hexdigest() == digest
    assert sig_path(path).is_file()
    # The executed notebook and report point where the evidence now lives, never at the private folder.
    d = json.loads(path.read_bytes())
    assert d["run_dir"] == str(result.run_dir.relative_to(reg.root))
    assert d["notebooks"][0]["executed"] == str((result.run_dir / "bad_model.ipynb").relative_to(reg.root))


def test_a_planted_link_cannot_redirect_the_gates_writes(tmp_path, registered):
    """The registry's gates/ folder replaced by a link to a folder outside it: the gate writes nothing
    there (every component is opened without following links) and says what is wrong; no result exists."""
    from kit.errors import GateError

    reg, mv = registered
    outside = tmp_path / "outside"
    outside.mkdir()
    gates = reg.gate_root(mv.name, mv.version)
    if gates.exists():
        gates.rmdir()
    gates.symlink_to(outside, target_is_directory=True)
    nb = _failing_notebook(tmp_path / "bad_model.ipynb")
    with pytest.raises(GateError, match="Cannot write the gate's evidence .* at 'gates'"):
        gate.run_gate(reg, mv.name, mv.version, notebooks=[nb], timeout=120)
    assert list(outside.iterdir()) == []
    assert reg.passing_gate(mv) is None
