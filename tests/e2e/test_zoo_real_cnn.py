"""The real-model zoo, part 2: MobileNetV3-Small, EfficientNet-B0 and bfloat16 outputs, each captured,
gated without --force, promoted and served on each backend (what and how: tests/e2e/test_zoo_real.py).
"""

from __future__ import annotations

import pytest
from zoo.real import REAL
from zoo.real_deploy import check_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
MODELS = [z for z in REAL if z.name in ("mobilenet-v3-small", "efficientnet-b0", "bf16-out")]


# One test per model (not a module fixture shared by several tests); the zoo is split over three files
# (test_zoo_real.py, test_zoo_real_cnn.py, test_zoo_real_text.py) so that make test's per-file workers run them at once.
@pytest.mark.parametrize("z", MODELS, ids=[z.name for z in MODELS])
def test_captured_gated_promoted_and_served_on_each_backend(z, tmp_path, artifacts_dir, repo_root):
    check_model(z, tmp_path, artifacts_dir, repo_root)
