"""A ~400 MB model (100.7M float32 parameters) registers, verifies, loads, passes the default gate and
serves with 2 gunicorn workers that share one copy of its weights: the weights' mapping of model.pt2 is
shared page cache in both workers, and each worker's unique memory (USS) exceeds that of the same service
around a 5K-parameter model by at most 25% of the weight size. Drives benchmarks/large_model.py.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_large_model_serves_with_two_workers_sharing_the_weights(tmp_path, repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        from large_model import run
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))
    # No model.onnx: the services serve torch, and exporting 400 MB more (saved, copied and hashed) took ~7 CPU-s
    # for no check here (the exporter embeds weights under 2 GB as it does for the small models of other tests).
    r = run(tmp_path, workers=2, onnx=False)
    weights = r["model_pt2_bytes"]
    assert weights > 400e6 and r["verified"] and r["readyz_status"] == "ok" and r["first_answer_version"] == 1
    assert r["gate_passed"], r["gate_error"]
    assert r["workers"] == 2
    assert max(r["added_uss_per_worker"]) <= 0.25 * weights, r["added_uss_per_worker"]
    for pid, m in r["per_worker"].items():
        mapping = m["model_pt2_mapping"]
        assert mapping["rss"] >= 0.9 * weights, f"worker {pid} never touched its weights: {mapping}"
        private = mapping["private_clean"] + mapping["private_dirty"]
        assert private <= 0.25 * weights, f"worker {pid} holds {private} private bytes of the weights"
