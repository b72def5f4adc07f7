"""schemathesis against a real gunicorn service's /openapi.json, with a JWT (bounded: about
1,000 cases; `make fuzz` sends more than 10,000): no 5xx, no failed check, no worker death.

The runner lives in tests/fuzz_service.py (also `python tests/fuzz_service.py --help`).
"""

from __future__ import annotations

import pytest
from fuzz_service import run_fuzz

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_schemathesis_finds_no_server_error_and_kills_no_worker(tmp_path):
    r = run_fuzz(110, workdir=tmp_path, database="none")  # the seed's cases alone; see run_fuzz
    summary = (f"{r.cases} cases, statuses {r.statuses}, failures {r.failures[:5]}, errors {r.errors}, "
               f"workers {r.workers_before} -> {r.workers_after}, log {r.log_trouble[:5]}\n{r.output_tail[-2500:]}")
    assert r.cases >= 900, summary  # the bound is real: a run that sent little proves little
    assert set(r.statuses) >= {"200", "400", "401"}, summary  # valid, invalid and unauthenticated cases
    assert r.server_errors == 0 and not r.failures and not r.errors, summary
    assert len(r.workers_before) == 2 and r.workers_after == r.workers_before and not r.log_trouble, summary
    assert r.exit_code == 0 and r.ok, summary
