"""The real-model zoo, part 3: a ViT, BERT, DistilBERT, GPT-2, a T5 encoder and an LSTM, each captured,
gated without --force, promoted and served on each backend (what and how: tests/e2e/test_zoo_real.py).
"""

from __future__ import annotations

import pytest
from zoo.real import REAL
from zoo.real_deploy import check_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
MODELS = [z for z in REAL if z.name in ("vit-tiny", "bert-seqcls", "distilbert", "gpt2", "t5-encoder", "lstm")]


# One test per model (not a module fixture shared by several tests); the zoo is split over three files
# (test_zoo_real.py, test_zoo_real_cnn.py, test_zoo_real_text.py) so that make test's per-file workers run them at once.
@pytest.mark.parametrize("z", MODELS, ids=[z.name for z in MODELS])
def test_captured_gated_promoted_and_served_on_each_backend(z, tmp_path, artifacts_dir, repo_root):
    check_model(z, tmp_path, artifacts_dir, repo_root)
