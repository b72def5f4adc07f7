"""Issue 19's real-model zoo end to end: torchvision's ResNet-18 (224 px), MobileNetV3-Small, EfficientNet-B0,
a small ViT and ConvNeXt (published definitions, tests/zoo/tv_*.py), BertForSequenceClassification,
DistilBERT, GPT-2 (use_cache=False), a T5 encoder as transformers returns them, an LSTM, and float16 /
bfloat16 inputs and outputs, all with random weights and keyword (dict) example inputs.

Per model, as a researcher runs it: a venv with Kit's installed wheel (``kit[notebook,onnx]`` and
transformers; tests/fixtures/kit_wheel.py), a project folder holding the model code and kit.toml, and a script
(tests/zoo/wheel_deploy.py) calling ``kit.deploy.deploy`` (what ``%deploy --promote`` runs): capture and
register v1 (signed with the project's key), the default gate without force (v1 on its own checks), promote;
then v2 (the last bias nudged) gated against v1 as production and promoted. Where capture exported ONNX the
production version is gated on onnxruntime too. Each backend's generated service runs under the venv's
gunicorn on 127.0.0.1; /predict on fresh inputs (another batch size and sequence length; /predict JSON at
batch 1, v2 /infer with binary inputs at batch 3, since three 224 px images in JSON are over the default
8 MiB body limit) equals eager, computed in this process from the same seeded definitions, within the
tolerance capture recorded.

The gate runs the packaged default notebook with its default thresholds; only ``batch_n`` (rows of the
finite/agreement checks and the batch of the latency comparison: 64 by default) and ``latency_repeats``
are made smaller, so that ResNet-18 at batch 64 does not spend minutes of two shared cores per gate.
Times go to test-artifacts/zoo_real_times.json.

``make test-zoo`` runs it (about 5 minutes of two cores), not ``make test``; CI runs both.
"""

from __future__ import annotations

import pytest
from zoo.real import REAL
from zoo.real_deploy import check_model

pytestmark = [pytest.mark.zoo, pytest.mark.slow, pytest.mark.timeout(1500)]


# One test per model, no shared fixtures: make test-zoo's workers take the next model as they free up
# (REAL lists the costliest first).
@pytest.mark.parametrize("z", REAL, ids=[z.name for z in REAL])
def test_captured_gated_promoted_and_served_on_each_backend(z, tmp_path, artifacts_dir, repo_root):
    check_model(z, tmp_path, artifacts_dir, repo_root)
