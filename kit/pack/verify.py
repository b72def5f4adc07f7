"""``verify_archive()``: unpack an archive somewhere else, start it with its run.sh, ask it, stop it.

This is what a server does with the archive, done on this machine: extract into a temporary folder,
``run.sh start`` on a free port on 127.0.0.1 (so relocation, sha256 verification and the environment
fingerprint check all run), wait for ``/readyz``, send the stored example of the production version to
``/predict`` and compare the answer with the stored reference output, then stop the service.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kit._proc import free_port, stop_group, tail, wait_http
from kit.errors import PackError
from kit.pack._tar import archive_codec, tar_extract_args
from kit.pack.audit import audit
from kit.pack.integrity import check_archive
from kit.pack.runtime import MANIFEST
from kit.signing import Trust

# how far an archive's answer to the stored example may be from the reference (float32 across environments)
VERIFY_ATOL, VERIFY_RTOL = 1e-5, 1e-4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    archive: str
    ok: bool
    root: str
    url: str
    model: str
    version: int
    max_abs_diff: float
    unpack_seconds: float
    ready_seconds: float  # run.sh start -> /readyz 200 (relocation, verification, gunicorn, model load)
    first_answer_seconds: float
    log_tail: str = ""
    audit: dict[str, int] | None = None  # the import audit: modules imported, from env/, from the stdlib

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract(archive: Path, dest: Path, fileobj: BinaryIO | None = None) -> Path:
    """Extract ``archive`` (read from ``fileobj`` when given: the open file that was checked) into ``dest``
    and return the folder it holds."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = shutil.which("tar")
    if tar:
        src = str(archive) if fileobj is None else "-"
        res = subprocess.run([tar, *tar_extract_args(archive_codec(archive.name)), "-xf", src, "-C", str(dest)],
                             capture_output=True, stdin=fileobj, check=False)
        if res.returncode != 0:
            raise PackError(f"Extracting {archive} failed: {res.stderr.decode(errors='replace').strip()[-500:]}")
    else:  # pragma: no cover - every supported server has tar
        import tarfile

        with tarfile.open(archive, "r:gz", fileobj=fileobj) as tf:
            tf.extractall(dest, filter="fully_trusted")  # our own archive: absolute venv links are expected
    roots = [p for p in dest.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    if len(roots) != 1:
        raise PackError(f"{archive} does not hold exactly one kit pack folder (found {[p.name for p in roots]}).")
    return roots[0]


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0,
          api_key: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"null")
        except ValueError:
            payload = None
        return exc.code, payload


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> float:
    """Wait for ``url``/readyz to answer 200 (seconds waited); :class:`PackError` with the log tail when
    run.sh exits first or time runs out."""
    return wait_http(url + "/readyz", timeout=timeout, process=proc, log_path=log_path, what="run.sh",
                     error=PackError)


def start_unpacked(root: Path, port: int, log_path: Path, extra_env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``run.sh start`` in its own process group, with a clean environment (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "KIT_", "VIRTUAL_ENV", "CONDA"))}
    env["KIT_BIND"] = f"127.0.0.1:{port}"
    env.update(extra_env or {})
    logf = open(log_path, "ab")
    try:
        return subprocess.Popen([str(root / "run.sh"), "start"], cwd=str(cwd or root.parent), env=env,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        logf.close()


def _example(root: Path, model: str, version: int) -> tuple[Any, list[Any], list[str]]:
    """(request inputs, reference outputs in signature order, output names) of a shipped version: one array
    for a one-input model, else ``{name: array}`` (what /predict takes)."""
    import numpy as np

    vdir = root / "registry" / model / "versions" / str(version)
    sig = json.loads((vdir / "meta.json").read_text()).get("signature") or {}
    in_names = [str(i["name"]) for i in sig.get("inputs", [])]
    out_names = [str(o["name"]) for o in sig.get("outputs", [])]
    with np.load(vdir / "example.npz", allow_pickle=False) as z:
        ins = [z[k].copy() for k in sorted((k for k in z.files if k.startswith("input_")), key=lambda k: int(k[6:]))]
        outs = [z[k].copy() for k in sorted((k for k in z.files if k.startswith("output_")), key=lambda k: int(k[7:]))]
    if len(ins) == 1:
        return ins[0], outs, out_names
    return dict(zip(in_names, ins, strict=True)), outs, out_names


def predict_example(url: str, root: Path, model: str, versions: list[int], attempts: int = 20,
                    api_key: str | None = None) -> tuple[int, float]:
    """POST a stored example; compare with the stored reference output of the version that answered (the one
    rule, :func:`kit.backends.parity.compare`, within ``VERIFY_ATOL`` + ``VERIFY_RTOL`` x |reference|)."""
    import numpy as np

    from kit.backends.parity import compare

    examples = {v: _example(root, model, v) for v in versions}
    x = examples[versions[0]][0]
    body_in = {k: a.tolist() for k, a in x.items()} if isinstance(x, dict) else x.tolist()
    for _ in range(attempts):
        status, body = _http(url + "/predict", {"inputs": body_in}, api_key=api_key)
        if status != 200 or not isinstance(body, dict):
            raise PackError(f"POST {url}/predict answered {status}: {body!r}")
        v = int(body.get("model_version", -1))
        if v not in examples:
            raise PackError(f"/predict was answered by version {v}, which the archive does not ship ({versions}).")
        if not _same_inputs(examples[v][0], x):
            continue  # a canary with another example answered; ask again
        _, refs, names = examples[v]
        outs = body["outputs"]
        got_all = [outs[n] for n in names] if isinstance(outs, dict) else [outs]
        if len(got_all) != len(refs):
            raise PackError(f"{model}@{v} from the archive answered {len(got_all)} outputs where its stored reference "
                            f"has {len(refs)}; the packed service is not the one registered.")
        got = [np.asarray(g, dtype=r.dtype) for g, r in zip(got_all, refs)]
        m = compare(got, refs, atol=VERIFY_ATOL, rtol=VERIFY_RTOL)
        if not m.ok:
            raise PackError(f"{model}@{v} from the archive answered outputs {[g.shape for g in got]} differing from "
                            f"the stored reference by {m.max_abs_diff:.3g} (allowed {VERIFY_ATOL:g} + {VERIFY_RTOL:g} "
                            "x |reference|); the packed environment computes differently.")
        return v, m.max_abs_diff
    raise PackError(f"No answer from the production version after {attempts} requests to {url}/predict.")


def _same_inputs(a: Any, b: Any) -> bool:
    import numpy as np

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return not isinstance(a, dict) and not isinstance(b, dict) and bool(np.array_equal(a, b))


def _name_missing(root: Path, manifest: dict[str, Any], env: dict[str, str], failure: PackError) -> None:
    """After a failed start: when the audit finds an import the archive lacks, raise that (it names the
    module and the distribution left out) instead of the bare log tail."""
    if not (root / "env" / "bin" / "python").exists():
        return
    try:
        audit(root, manifest, env)
    except PackError as exc:
        if "which the archive does not hold" in str(exc) or "not in the archive's environment" in str(exc):
            raise PackError(f"{exc}\n(the service did not start: {str(failure)[-1500:]})") from failure


def verify_archive(archive: Path, *, timeout: float = 180.0, workdir: Path | None = None,
                   progress: Callable[[str], None] | None = None, trusted_keys: Sequence[str] = ()) -> VerifyReport:
    """Unpack ``archive`` into a temporary folder, serve it, check /readyz and the stored example, stop.

    ``trusted_keys`` (``ed25519:...``): the archive's ``.sha256.sig`` must verify with one of them before
    anything is extracted (what the ship steps do with openssl), and run.sh gets them as ``KIT_TRUST``, so
    the file list's signature is checked as on a server that trusts them.
    """
    archive = Path(archive).absolute()
    if not archive.is_file():
        raise PackError(f"No archive at {archive}; build one with `kit pack services/NAME`.")

    def say(msg: str) -> None:
        log.info("%s", msg)
        if progress:
            progress(msg)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="kit-verify-", dir=workdir)
    try:
        tmp = Path(tmp_ctx.name)
        t = time.monotonic()
        with open(archive, "rb") as f:
            if trusted_keys:
                by = check_archive(archive, f, Trust.from_texts(trusted_keys))
                say(f"{archive.name} is signed by a trusted key ({by}) and matches its signed sha256")
                f.seek(0)
            say(f"extracting {archive.name} into {tmp}")
            root = extract(archive, tmp / "unpacked", fileobj=f)
        unpack_s = time.monotonic() - t
        manifest = json.loads((root / MANIFEST).read_text())
        (model, m), = manifest["models"].items()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp / "service.log"
        say(f"starting {root.name}/run.sh on {url}")
        t = time.monotonic()
        # A one-time API key, valid only for this verification run: the service's own keys are stored
        # hashed, so the verifier adds its key's digest through KIT_API_KEYS_SHA256 and sends the key.
        key = secrets.token_urlsafe(24)
        extra = {"KIT_API_KEYS_SHA256": hashlib.sha256(key.encode()).hexdigest(),
                 "KIT_STATE_DIR": str(tmp / "state")}  # run.sh's key for a conda record: gone with this run
        if trusted_keys:
            (tmp / "trusted_keys").write_text("".join(f"{k}\n" for k in trusted_keys))
            extra["KIT_TRUST"] = str(tmp / "trusted_keys")
        extra["XDG_CACHE_HOME"] = str(tmp / "cache")  # the service's verified copies: gone with this run
        proc = start_unpacked(root, port, log_path, cwd=tmp, extra_env=extra)
        audit_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "PYTHONNOUSERSITE": "1",
                     "PYTHONDONTWRITEBYTECODE": "1", "XDG_CACHE_HOME": str(tmp / "audit-cache")}
        try:
            try:
                wait_ready(url, proc, timeout, log_path)
            except PackError as exc:  # a missing import is named by the audit (run.sh has checked and relocated)
                _name_missing(root, manifest, audit_env, exc)
                raise
            ready_s = time.monotonic() - t
            t = time.monotonic()
            version, max_diff = predict_example(url, root, model, [int(v) for v in m["versions"]], api_key=key)
            answer_s = time.monotonic() - t
            say(f"{model}@{version} answered the stored example within {max_diff:.2g} of its reference")
        finally:
            stop_group(proc, timeout=30, whole_group=True)
        checked = audit(root, manifest, audit_env)
        say(f"import audit: the service imports {checked.modules} modules, {checked.from_env} from the archive's "
            f"env/, {checked.from_stdlib} from the interpreter's standard library, nothing missing")
        return VerifyReport(archive=str(archive), ok=True, root=root.name, url=url, model=model, version=version,
                            max_abs_diff=max_diff, unpack_seconds=round(unpack_s, 2), ready_seconds=round(ready_s, 2),
                            first_answer_seconds=round(answer_s, 3), log_tail=tail(log_path, 40),
                            audit=checked.to_dict())
    finally:
        tmp_ctx.cleanup()
