"""Fuzz a real Kit service with schemathesis, driven by the service's own /openapi.json, with auth.

A two-input model (float32 ``x[batch, 8]`` and int64 ``ids[batch, 3]``) is registered in a temporary
registry and served by gunicorn (2 workers, API keys and HS256 JWTs on); schemathesis then sends
``--max-examples`` cases per operation (positive and negative: schema-valid and schema-breaking bodies,
headers and paths) with a valid JWT. It passes when no response is a 5xx and no worker died (the master's
children are the same processes before and after, and the log has no worker failure).

    python tests/fuzz_service.py --max-examples 1200          # make fuzz: >= 10,000 cases
    python tests/fuzz_service.py --max-examples 90 --seed 2

The test suite runs a bounded version (tests/e2e/test_fuzz_service.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SECRET = "fuzz-" + "0123456789abcdef" * 3
API_KEY = "fuzz-key"
AUD = "kit-fuzz"
# what a worker's death or a server error leaves in a gunicorn log
WORKER_TROUBLE = re.compile(r"WORKER TIMEOUT|Worker \(pid:\d+\) was sent|Worker exited|Booting worker|"
                            r"Traceback|unhandled error", re.I)


@dataclass
class FuzzResult:
    cases: int  # test cases schemathesis generated and sent
    failures: list[str]  # failed checks, one line each
    errors: list[str]  # schemathesis could not test something (an operation's cases were not all sent)
    server_errors: int  # responses with status >= 500
    statuses: dict[str, int]
    workers_before: list[int]
    workers_after: list[int]
    log_trouble: list[str]  # gunicorn log lines that tell of a crash, a restart or a 500
    seconds: float
    exit_code: int
    output_tail: str = field(repr=False, default="")

    @property
    def ok(self) -> bool:
        return (self.server_errors == 0 and not self.failures and not self.errors and not self.log_trouble
                and self.workers_before == self.workers_after and len(self.workers_before) > 0)


class TwoInputs:  # a module-level factory: torch is imported only when the fuzz runs
    @staticmethod
    def build():  # type: ignore[no-untyped-def]
        import torch
        from torch import nn

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(8, 3)

            def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
                return self.lin(x) + ids.float().sum(1, keepdim=True)

        torch.manual_seed(0)
        return Model().eval(), (torch.randn(2, 8), torch.randint(0, 100, (2, 3)))


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (gunicorn's workers), sorted."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(out)


def token(secret: str = SECRET, sub: str = "fuzzer", seconds: int = 3600) -> str:
    import jwt

    return jwt.encode({"sub": sub, "aud": AUD, "exp": int(time.time()) + seconds}, secret, algorithm="HS256")


def serve(root: Path):  # type: ignore[no-untyped-def]
    """Register the model and start its service (a :class:`kit.servicegen.RunningService`)."""
    from kit.registry import Registry
    from kit.servicegen import generate, start_service
    from kit.serving.security import hash_key

    reg = Registry(root / "registry", require_gate=False, user="fuzz")
    model, example = TwoInputs.build()
    reg.register("fuzz", model, example, onnx=False)  # served by torch: no ONNX export to pay for
    reg.promote("fuzz", 1, force=True, why="fuzzing")
    d = generate("fuzz", "fuzz", registry=reg.root, out_dir=root / "services", workers=2,
                 api_keys_sha256=(hash_key(API_KEY),), jwt=True, jwt_audience=[AUD], max_batch=16,
                 max_body_bytes=256 * 1024, access_log=False)
    return start_service(d, timeout=120, env={**os.environ, "KIT_JWT_SECRET": SECRET},
                         log_path=root / "gunicorn.log")


# schemathesis's CLI, with one repair: hypothesis describes a lambda by parsing its source file with ast,
# and CPython 3.11.7's ast constructor turns a RecursionError there into "SystemError: AST constructor
# recursion depth mismatch" (cpython#106905), which aborted the fuzzing phase of POST /predict. The
# description is cosmetic (a repr), so a failed one becomes "lambda: <unknown>".
LAUNCHER = """
import sys
import hypothesis.internal.lambda_sources as ls
_describe = ls._lambda_description
def _safe(f, *args, **kwargs):
    try:
        return _describe(f, *args, **kwargs)
    except (SystemError, RecursionError):
        return "lambda: <unknown>"
ls._lambda_description = _safe
from schemathesis.cli import schemathesis
sys.argv[0] = "schemathesis"
sys.exit(schemathesis())
"""


# JSON Schema cannot say "every input has the same number of rows", so a schema-valid two-input body can
# still be a 400; every other check schemathesis has must pass.
EXCLUDED_CHECKS = "positive_data_acceptance"


def schemathesis(url: str, max_examples: int, report: Path, seed: int, checks: str,
                 database: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", LAUNCHER, "run", f"{url}/openapi.json",
           "--checks", checks, "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", str(max_examples), "--seed", str(seed),
           "--phases", "examples,coverage,fuzzing", "--workers", "2", "--no-shrink",
           "--suppress-health-check", "all", "--request-timeout", "30", "--continue-on-failure",
           "--header", f"Authorization: Bearer {token()}",
           "--report", "ndjson", "--report-ndjson-path", str(report), "--warnings", "off",
           *(["--generation-database", database] if database else [])]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1", "COLUMNS": "160"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)


def count(report: Path) -> tuple[int, dict[str, int], list[str], list[str]]:
    """(cases, responses by status, failed checks, errors) from schemathesis's ndjson event stream."""
    cases, statuses, failures, errors = 0, {}, [], []
    for line in report.read_text().splitlines():
        ev = json.loads(line)
        for kind, body in ev.items():
            if kind in ("NonFatalError", "FatalError"):
                errors.append(f"{kind} in {body.get('phase')} {body.get('label')}: {str(body.get('value'))[:300]}")
            if kind != "ScenarioFinished":
                continue
            for _case in (body.get("recorder") or {}).get("cases", {}).values():
                cases += 1
            for inter in (body.get("recorder") or {}).get("interactions", {}).values():
                resp = inter.get("response") or {}
                code = str(resp.get("status_code", "none"))
                statuses[code] = statuses.get(code, 0) + 1
            for checks in (body.get("recorder") or {}).get("checks", {}).values():
                for c in checks:
                    if c.get("status") == "failure":
                        f = (c.get("failure_info") or {}).get("failure") or {}
                        failures.append(f"{c.get('name')} {f.get('code')} {f.get('operation')}: "
                                        f"{str(f.get('message'))[:200]} (case {f.get('case_id')})")
    return cases, statuses, sorted(set(failures)), errors


def run_fuzz(max_examples: int, *, seed: int = 1, checks: str = "all", workdir: Path | None = None,
             database: str | None = None) -> FuzzResult:
    """Serve the model, fuzz it, stop it; the result says what happened.

    ``database``: schemathesis's example database. None: its default, a folder (.hypothesis/ in the
    working directory) whose examples from earlier runs are tried again first. "none": the run is its
    seed's alone, and hypothesis keeps no pareto front of the targeted scores (with a database it shrinks
    that front, about half of the fuzzing phase's CPU on the two v2 infer operations), same cases sent."""
    root = Path(workdir or tempfile.mkdtemp(prefix="kit-fuzz-"))
    t0 = time.perf_counter()
    with serve(root) as running:
        time.sleep(1.0)  # both workers up
        before = children(running.pid)
        res = schemathesis(running.url, max_examples, root / "events.ndjson", seed, checks, database)
        after = children(running.pid)
        log = running.logs()
    seconds = time.perf_counter() - t0
    cases, statuses, failures, errors = count(root / "events.ndjson")
    trouble = [ln for ln in log.splitlines() if WORKER_TROUBLE.search(ln)]
    boot = [ln for ln in trouble if "Booting worker" in ln]
    trouble = [ln for ln in trouble if "Booting worker" not in ln] + boot[len(before):]  # the first boots are fine
    return FuzzResult(cases=cases, failures=failures, errors=errors, server_errors=sum(n for s, n in statuses.items() if s[0] == "5"),
                      statuses=dict(sorted(statuses.items())), workers_before=before, workers_after=after,
                      log_trouble=trouble[:20], seconds=round(seconds, 1), exit_code=res.returncode,
                      output_tail=(res.stdout + res.stderr)[-4000:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-examples", type=int, default=1200, help="cases per API operation")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--checks", default="all", help="schemathesis checks that fail the run "
                   f"(default: all but {EXCLUDED_CHECKS})")
    p.add_argument("--database", default=None, help="schemathesis's example database: none, :memory: or a "
                   "folder (default: its own, .hypothesis/ here, which replays what earlier runs found)")
    a = p.parse_args(argv)
    r = run_fuzz(a.max_examples, seed=a.seed, checks=a.checks, database=a.database)
    print(r.output_tail)
    print(json.dumps({k: v for k, v in asdict(r).items() if k != "output_tail"}, indent=1))
    print(f"fuzz: {r.cases} cases in {r.seconds:.0f} s, {r.server_errors} server errors, "
          f"{len(r.failures)} failed checks, {len(r.errors)} errors, workers {'unchanged' if r.workers_before == r.workers_after else 'CHANGED'}"
          f" -> {'ok' if r.ok else 'FAILED'}")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
