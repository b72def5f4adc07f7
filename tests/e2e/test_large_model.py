"""A ~400 MB model (100.7M float32 parameters) registers, verifies, loads and serves with 2 gunicorn workers
that share one copy of its weights: the weights' mapping of model.pt2 is shared page cache in both
workers, and neither worker's unique memory (USS) comes near a private copy. Drives benchmarks/large_model.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_large_model_serves_with_two_workers_sharing_the_weights(tmp_path, repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        from large_model import run
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))
    r = run(tmp_path, workers=2)
    weights = r["model_pt2_bytes"]
    assert weights > 400e6 and r["verified"] and r["readyz_status"] == "ok" and r["first_answer_version"] == 1
    assert r["workers"] == 2
    for pid, m in r["per_worker"].items():
        mapping = m["model_pt2_mapping"]
        assert mapping["rss"] >= 0.9 * weights, f"worker {pid} never touched its weights: {mapping}"
        private = mapping["private_clean"] + mapping["private_dirty"]
        assert private <= 0.25 * weights, f"worker {pid} holds {private} private bytes of the weights"
        # a private copy of the weights would put USS above the weight size; the rest is torch's runtime
        assert m["uss"] < 0.5 * weights, f"worker {pid}: USS {m['uss']} for {weights} bytes of weights"
