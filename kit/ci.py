"""``kit init --ci github|gitlab``: a pipeline that gates a version of the shared registry on every push,
with the CI's own signing key, keeps report.html as a build artifact, and promotes only on a pass.

Both pipelines run one script, ``ci/kit-gate.sh``, so what CI does is exactly what a person (or a test) runs
with the same variables::

    KIT_REGISTRY          the shared registry, e.g. s3://bucket/prefix (a variable)
    KIT_GATE_MODEL        the model to gate; KIT_GATE_REF the version (default latest)
    KIT_CI_SIGNING_KEY    the CI key's private key, PEM text (a secret): it signs the gate and the move
    KIT_TRUSTED_KEYS      the public keys whose versions CI will judge (the developers'), comma-separated
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (secrets), AWS_REGION, AWS_ENDPOINT_URL (variables)

Services must trust the CI key's public key ([trust] public_keys) to follow the moves it signs.
"""

from __future__ import annotations

from pathlib import Path

from kit.errors import ConfigError

CI_KINDS = ("github", "gitlab")
SCRIPT = Path("ci") / "kit-gate.sh"
OUT_DIR = "kit-gate"

_SCRIPT = r'''#!/bin/sh
# Kit's validation gate in CI (written by `kit init --ci`; both pipelines run this, nothing else).
# Gates $KIT_GATE_MODEL@${KIT_GATE_REF:-latest} in the shared registry with the CI's own signing key, keeps
# the report in kit-gate/, and promotes that exact version only when the gate passed.
set -eu
: "${KIT_REGISTRY:?set KIT_REGISTRY to the shared registry, e.g. s3://bucket/prefix}"
: "${KIT_GATE_MODEL:?set KIT_GATE_MODEL to the model to gate}"
: "${KIT_CI_SIGNING_KEY:?set the secret KIT_CI_SIGNING_KEY to the CI key (the .pem of kit keys new)}"
out="${KIT_GATE_OUT:-kit-gate}"
mkdir -p "$out"
key="$(mktemp)"
trap 'rm -f "$key"' EXIT
chmod 600 "$key"
printf '%s\n' "$KIT_CI_SIGNING_KEY" > "$key"
KIT_SIGNING_KEY="$key"
export KIT_SIGNING_KEY
# The runner's access first: each failing check names the IAM action, setting or store feature it lacks.
if ! kit registry check --write > "$out/registry-check.txt" 2>&1; then
  cat "$out/registry-check.txt" >&2
  echo "kit-gate: this runner cannot write $KIT_REGISTRY (the checks above); nothing gated." >&2
  exit 2
fi
status=0
kit validate "$KIT_GATE_MODEL@${KIT_GATE_REF:-latest}" --json > "$out/gate.json" || status=$?
version="$(python - "$out" <<'PY'
import json, pathlib, shutil, sys
out = pathlib.Path(sys.argv[1])
try:
    r = json.loads((out / "gate.json").read_text())
except ValueError:
    sys.exit(0)
report = pathlib.Path(str(r.get("report_path") or ""))
if report.is_file():
    shutil.copyfile(report, out / "report.html")
print(r.get("version") if r.get("passed") is True else "")
PY
)"
if [ "$status" -ne 0 ] || [ -z "$version" ]; then
  echo "kit-gate: $KIT_GATE_MODEL@${KIT_GATE_REF:-latest} did not pass (kit validate exit $status); nothing promoted." >&2
  exit "$(( status == 0 ? 1 : status ))"
fi
kit promote "$KIT_GATE_MODEL@$version" --why "CI gate passed (${CI_COMMIT_SHA:-${GITHUB_SHA:-local}})"
'''

_GITHUB = '''# Written by `kit init --ci github`: on a push, gate a version of the shared registry with this CI's own
# key, keep report.html, promote only on a pass (the steps are ci/kit-gate.sh). Repository settings:
#   variables: KIT_REGISTRY, KIT_GATE_MODEL, KIT_TRUSTED_KEYS, AWS_REGION, AWS_ENDPOINT_URL (not on AWS)
#   secrets:   KIT_CI_SIGNING_KEY, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
name: kit-gate
on:
  push:
    branches: [main]
  workflow_dispatch: {}
jobs:
  gate:
    runs-on: ubuntu-latest
    timeout-minutes: 60
    env:
      KIT_REGISTRY: ${{ vars.KIT_REGISTRY }}
      KIT_GATE_MODEL: ${{ vars.KIT_GATE_MODEL }}
      KIT_TRUSTED_KEYS: ${{ vars.KIT_TRUSTED_KEYS }}
      KIT_CI_SIGNING_KEY: ${{ secrets.KIT_CI_SIGNING_KEY }}
      AWS_ACCESS_KEY_ID: ${{ secrets.AWS_ACCESS_KEY_ID }}
      AWS_SECRET_ACCESS_KEY: ${{ secrets.AWS_SECRET_ACCESS_KEY }}
      AWS_REGION: ${{ vars.AWS_REGION }}
      AWS_ENDPOINT_URL: ${{ vars.AWS_ENDPOINT_URL }}
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - name: Environment (the project's own; it must provide kit[s3] and the model's dependencies)
        run: python -m pip install -e .
      - name: Gate, keep the report, promote on a pass
        run: sh ci/kit-gate.sh
      - uses: actions/upload-artifact@v4
        if: always()
        with:
          name: kit-gate-report
          path: kit-gate/
'''

_GITLAB = '''# Written by `kit init --ci gitlab`: on a push, gate a version of the shared registry with this CI's own
# key, keep report.html, promote only on a pass (the steps are ci/kit-gate.sh). CI/CD variables:
#   KIT_REGISTRY, KIT_GATE_MODEL, KIT_TRUSTED_KEYS, AWS_REGION, AWS_ENDPOINT_URL (not on AWS);
#   masked: KIT_CI_SIGNING_KEY, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
kit-gate:
  image: python:3.11
  rules:
    - if: $CI_PIPELINE_SOURCE == "push"
  script:
    - python -m pip install -e .   # the project's environment: kit[s3] and the model's dependencies
    - sh ci/kit-gate.sh
  artifacts:
    when: always
    paths:
      - kit-gate/
'''


def pipeline_path(kind: str) -> Path:
    return Path(".github") / "workflows" / "kit-gate.yml" if kind == "github" else Path(".gitlab-ci.yml")


def write_ci(root: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """Write ``ci/kit-gate.sh`` and the ``kind`` pipeline under ``root``; (written, kept). Never overwrites."""
    if kind not in CI_KINDS:
        raise ConfigError(f"Unknown CI {kind!r}; kit writes pipelines for: {', '.join(CI_KINDS)}.")
    written, kept = [], []
    for rel, text, mode in ((SCRIPT, _SCRIPT, 0o755), (pipeline_path(kind), _GITHUB if kind == "github" else _GITLAB,
                                                         0o644)):
        path = Path(root) / rel
        if path.exists():
            kept.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        written.append(path)
    return written, kept
