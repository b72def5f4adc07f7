"""`make pack` as it runs here: the real generated service, the real (venv) environment with torch, the
demo model; packed once by the CLI (`kit pack --verify --json`: unpacked in a temporary folder, served,
checked), then the same archive shipped by the steps `kit pack` prints into another directory, run by
run.sh, predictions compared with the registry's.

The environment layer (~250 MB compressed, ~13 s to write) is cached in .cache/pack-layers (the CLI's too:
its dist/.layers links there) keyed by a stat of every shipped file of the environment and the archive
root, so a warm run re-packs in seconds; that cache keeps 3 layers, as many as this file packs (the torch
"demo", and "demo-ort" with and without orjson). Extraction (twice: --verify's and the ship steps', into
memory where /dev/shm allows) and start-up happen every run.
The venv fallback needs the same interpreter at the same path: true here (one machine), so a second host
is not exercised; the refusal when it is missing is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kit_testing import to_legacy_layout

from kit._proc import free_port, pid_alive, stop_group
from kit.pack import integrity, pack
from kit.pack.verify import _http, wait_ready
from kit.signing import KeyStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OPERATORS_KEY = "the-operators-secret"  # the demo service requires an API key, as the demo's does


@pytest.fixture(scope="module")
def demo_registry(tmp_path_factory, digits_model, _signing_keys_dir):
    """``demo-digits@1`` registered and promoted once for the module: every test packs it, none changes it."""
    import torch

    from kit.registry import Registry
    from kit.signing import Keyring

    model, split, acc = digits_model
    registry = Registry(tmp_path_factory.mktemp("pack-venv") / "registry", require_gate=True, user="tester",
                        keyring=Keyring(_signing_keys_dir))
    mv = registry.register("demo-digits", model, torch.from_numpy(split.x_test[:1]), metrics={"accuracy": acc})
    registry.promote(mv.name, mv.version, force=True, why="test")  # gates are the gate area's; forced here
    return registry, mv


SHM_PREFIX = "kit-test-pack-venv-"


@pytest.fixture(scope="module")
def extract_dir(tmp_path_factory):
    """Where archives are extracted: a folder in /dev/shm where that is a tmpfs with room and exec allowed
    (tar writes the ~0.85 GB tree there with ~1 s of kernel time, against ~11 s into ext4's page cache on
    this VM), else one under pytest's temporary folder. Removed afterwards: memory is no place to keep trees."""
    folder = _memory_folder()
    if folder is None:
        yield tmp_path_factory.mktemp("extract")
        return
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _memory_folder() -> Path | None:
    """A new folder of this process's in /dev/shm, or None where that will not do; the folders of processes
    that died (a timeout's kill skips the teardown) are removed first."""
    import tempfile

    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    if st.f_flag & os.ST_NOEXEC or not os.access(shm, os.W_OK | os.X_OK) or st.f_bavail * st.f_frsize < 4e9:
        return None
    for old in shm.glob(f"{SHM_PREFIX}*"):
        pid = old.name[len(SHM_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SHM_PREFIX}{os.getpid()}-", dir=shm))


@pytest.fixture
def server_dir(extract_dir):
    """A server's folder for the ship steps (the archive extracted there: ~0.85 GB), removed afterwards."""
    folder = extract_dir / "server"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class CliPack:
    registry: Any
    mv: Any
    result: dict[str, Any]  # kit pack --json: {"pack": PackResult.to_dict(), "verify": VerifyReport.to_dict()}
    stderr: str  # its progress lines


@pytest.fixture(scope="module")
def cli_pack(demo_registry, tmp_path_factory, repo_root, extract_dir) -> CliPack:
    """`kit pack services/demo --out dist --verify --json`, run once as a user runs it: pack (env layer
    cached), unpack in a temporary folder, serve, /readyz, the stored example, stop. The archive it wrote
    is the one the ship-steps test ships."""
    from kit.servicegen import generate
    from kit.serving.security import hash_key

    registry, mv = demo_registry
    tmp = tmp_path_factory.mktemp("cli-pack")
    svc = generate("demo", mv.name, registry=registry.root, out_dir=tmp / "services",
                   trusted_keys=registry.keyring.service_keys(),  # [trust]: the key that signed the model
                   api_keys_sha256=[hash_key(OPERATORS_KEY)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as the kit_env fixture
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", KIT_REGISTRY=str(registry.root),
               TMPDIR=str(extract_dir))  # where --verify unpacks
    cmd = [sys.executable, "-c", "from kit.cli import main; main()", "pack", str(svc), "--out", str(tmp / "dist"),
           "--verify", "--json"]
    # the CLI caches layers next to the archive: there, the shared cache (warm, and kept warm for the next run)
    shared = repo_root / ".cache" / "pack-layers"
    shared.mkdir(parents=True, exist_ok=True)
    (tmp / "dist").mkdir()
    (tmp / "dist" / ".layers").symlink_to(shared, target_is_directory=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    return CliPack(registry, mv, json.loads(out.stdout), out.stderr)


def test_kit_pack_verify_command(cli_pack):
    """`kit pack services/demo --verify`: pack (env layer cached), unpack in tmp, serve, /readyz, example, stop.

    The service requires an API key (as the demo's does): the verifier must get in with a one-time key of
    its own, since the service stores only digests.
    """
    verify = cli_pack.result["verify"]
    print(f"\n--verify: {verify['unpack_seconds']}s unpack, {verify['ready_seconds']}s to ready, "
          f"{verify['first_answer_seconds']}s first answer")
    assert verify["ok"] and verify["version"] == 1
    assert verify["max_abs_diff"] <= 1e-5
    assert "packing the venv" in cli_pack.stderr or "reusing" in cli_pack.stderr


def test_venv_pack_runs_elsewhere_and_predicts_like_the_registry(cli_pack, tmp_path, digits_model, server_dir):
    registry, mv, res = cli_pack.registry, cli_pack.mv, cli_pack.result["pack"]
    print(f"\nvenv archive {res['size_bytes'] / 1e6:.0f} MB, env {res['env_bytes'] / 1e9:.2f} GB, "
          f"{res['seconds']:.1f}s, layer cached: {res['layer_cached']}, {res['timings']}")
    packed = Path(res["archive"])
    assert packed.name == "demo-v1-linux-x86_64.tar.gz" and res["kind"] == "venv"
    assert res["models"] == {"demo-digits": [1]} and not res["forced"]
    assert "size report" in cli_pack.stderr
    assert res["signed_by"] == registry.keyring.signer().key_id and res["checked_files"] > 10_000
    # The server: another directory, only the archive and the two files beside it; the packer's PEM key put
    # there out of band. It runs exactly the steps `kit pack` prints (the key's path replaced): openssl and
    # sha256sum check the archive before tar extracts it, then run.sh starts with the same key as KIT_TRUST.
    server = server_dir
    pem = tmp_path / "packer.pem"
    pem.write_text(registry.keyring.signer().public.pem())
    for suffix in ("", ".sha256", ".sha256.sig"):
        shutil.copyfile(f"{packed}{suffix}", server / f"{packed.name}{suffix}")
    archive = server / packed.name
    steps = integrity.ship_text(archive, res["root"], res["signed_by"]).split("Then, on the server:\n", 1)[1]
    steps = steps.replace(integrity.SERVER_TRUST, str(pem))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    # A carrier's archive: its .sha256 rewritten and signed by a key of its own: refused before extracting.
    forged = tmp_path / "forged"
    forged.mkdir()
    os.link(packed, forged / archive.name)
    attacker = KeyStore(tmp_path / "attacker").new()
    integrity.sign_archive(forged / archive.name, attacker)
    out = subprocess.run(["bash", "-c", steps], cwd=forged, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "Signature Verification Failure" in out.stdout + out.stderr, out
    assert not (forged / res["root"]).exists(), "extracted before its signature was checked"

    root = server / res["root"]
    log = _serve_and_predict(steps, server, root, env, tmp_path / "run.log", registry.load(mv.name, mv.version),
                             digits_model[1].x_test[:64])
    text = log.read_text()
    assert "Signature Verified Successfully" in text and f"{archive.name}: OK" in text, text[-2000:]
    assert "verified" in text and "environment as packed" in text, text[-2000:]
    assert "signed by a trusted key" in text and "nothing added" in text, text[-2000:]
    assert "RuntimeWarning" not in text, text[-2000:]  # python -m kit.pack (runpy warned for kit.pack.runtime)

    kit_paths = [p for p in (root / "env").rglob("kit/__init__.py")]
    assert kit_paths and all(p.is_relative_to(root / "env") for p in kit_paths)
    assert "torch" in res["shipped"] and "jupyterlab" in res["left_out"] and "pytest" in res["left_out"]
    _run_sh_checks(root, tmp_path, res["checked_files"])


def _serve_and_predict(steps: str, server: Path, root: Path, env: dict[str, str], log: Path, loaded: Any,
                       x: np.ndarray) -> Path:
    """Run the ship steps in ``server`` on a free port; once ready, /predict (with the operator's key) must
    answer as the registry's model does, for a batch and for the stored example. The log's path."""
    import torch

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    with open(log, "ab") as logf:
        proc = subprocess.Popen(["bash", "-c", steps], cwd=server, env=dict(env, KIT_BIND=f"127.0.0.1:{port}"),
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc, 300, log)
        print(f"ready {time.monotonic() - t:.1f}s after the ship steps started (check, extract, run.sh)")
        assert not list((root / "env").glob("lib/python*/site-packages/__editable__*")), "editable kit was packed"
        assert list((root / "env").glob("lib/python*/site-packages/kit/serving"))
        expected = loaded(torch.from_numpy(x)).detach().numpy()
        t = time.monotonic()
        status, body = _http(url + "/predict", {"inputs": x.tolist()}, api_key=OPERATORS_KEY)
        print(f"first answer {time.monotonic() - t:.3f}s")
        assert status == 200, body
        assert body["model_version"] == 1
        np.testing.assert_allclose(np.asarray(body["outputs"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
        ex_in, ex_out = loaded.example_inputs[0].numpy(), loaded.reference_outputs[0].numpy()
        status, body = _http(url + "/predict", {"inputs": ex_in.tolist()}, api_key=OPERATORS_KEY)
        np.testing.assert_allclose(np.asarray(body["outputs"], dtype=np.float32), ex_out, rtol=1e-5, atol=1e-6)
    finally:
        stop_group(proc, timeout=30, whole_group=True)
    return log


def _run_sh_checks(root: Path, home: Path, checked_files: int) -> None:
    """run.sh on the served tree: the sealed start-up check, its systemd unit, `verify` on the tree as served
    and its refusals (an edited module and a tampered model, an added .pth, a missing interpreter).
    `verify` hashes every file: the two edits share one pass (each is named); the .pth (refused before any
    hashing, by the file-type check) and the interpreter (refused first) cost no pass."""
    clean = {"PATH": os.environ["PATH"], "HOME": str(home)}  # the HOME run.sh kept its key under
    for _ in range(2):  # the start-up file check alone: the first start sealed the tree it checked
        t = time.monotonic()
        out = subprocess.run([str(root / "run.sh"), "unpack"], capture_output=True, text=True, env=clean)
        print(f"run.sh file check (untouched, sealed, {checked_files} files) {time.monotonic() - t:.1f}s")
        assert out.returncode == 0 and "sealed tree unchanged" in out.stderr, out.stderr
    # systemd unit for this location passes systemd-analyze where it exists (no systemd PID 1 here to start it).
    unit = subprocess.run([str(root / "run.sh"), "systemd-unit"], capture_output=True, text=True, env=clean, check=True)
    assert f'ExecStart="{root}/run.sh" start' in unit.stdout
    if shutil.which("systemd-analyze"):
        (home / "kit-demo.service").write_text(unit.stdout)
        chk = subprocess.run(["systemd-analyze", "verify", str(home / "kit-demo.service")],
                             capture_output=True, text=True)
        assert chk.returncode == 0, chk.stderr
    # serving wrote nothing into the archive (no __pycache__ either): it verifies again as packed
    t = time.monotonic()
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    print(f"run.sh verify (every file checked) {time.monotonic() - t:.1f}s")
    assert out.returncode == 0, out.stderr

    # An edited module in env/ is refused before any interpreter of the archive starts, and a tampered model
    # file before gunicorn starts: both by run.sh's sha256 pass, which names every file that differs.
    app = next((root / "env").glob("lib/python*/site-packages/kit/serving/asgi.py"))
    model_file = root / "registry" / "demo-digits" / "versions" / "1" / "model.pt2"
    original, model = app.read_bytes(), model_file.read_bytes()
    app.write_bytes(original + b"\nimport os  # edited\n")
    model_file.write_bytes(model + b"x")
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "kit/serving/asgi.py: sha256 differs" in out.stderr, out.stderr
    assert "registry/demo-digits/versions/1/model.pt2: sha256 differs" in out.stderr, out.stderr
    app.write_bytes(original)
    model_file.write_bytes(model)
    # An added .pth is refused before any interpreter of the archive starts.
    pth = app.parents[2] / "zz-evil.pth"
    pth.write_text("import os; os.system('touch /tmp/kit-pack-pth-ran')\n")
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "zz-evil.pth" in out.stderr and "were not packed" in out.stderr, out.stderr
    pth.unlink()

    # The venv fallback needs its interpreter at the same path: a clear refusal when it is not there.
    alt = root / "run-elsewhere.sh"
    alt.write_text((root / "run.sh").read_text().replace(f'BASE_PYTHON="{sys.base_prefix}', 'BASE_PYTHON="/nonexistent'))
    alt.chmod(0o755)
    out = subprocess.run([str(alt), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "/nonexistent" in out.stderr
    assert "needs Python" in out.stderr and "conda" in out.stderr, out.stderr


def test_an_onnxruntime_archive_ships_no_torch_and_passes_verify(demo_registry, tmp_path, repo_root, extract_dir):
    """The onnxruntime backend's archive: no torch (nor anything only torch needs), kit pack --verify's
    checks pass (served from the unpacked archive, the stored example, the import audit) and the
    fingerprint run.sh compares is that of exactly what was shipped."""
    from kit.pack import verify_archive
    from kit.servicegen import generate

    registry, mv = demo_registry
    svc = generate("demo-ort", mv.name, registry=registry.root, out_dir=tmp_path / "services", workers=1,
                   backend="onnxruntime", trusted_keys=registry.keyring.service_keys())
    lines: list[str] = []
    res = pack(svc, out_dir=tmp_path / "dist", progress=lines.append, keyring=registry.keyring,
               cache_dir=repo_root / ".cache" / "pack-layers")
    print(f"\nonnxruntime archive {res.size_bytes / 1e6:.0f} MB, env {res.env_bytes / 1e6:.0f} MB, {res.seconds:.1f}s")
    assert res.backend == "onnxruntime" and "onnxruntime" in res.shipped
    assert res.left_out["torch"] == "not used by the onnxruntime backend"
    assert res.size_bytes < 120e6
    assert any(line.startswith("packages (onnxruntime backend)") for line in lines)
    trusted = tuple(k.text() for k in registry.keyring.trust().keys)
    rep = verify_archive(res.archive, trusted_keys=trusted, workdir=extract_dir)
    assert rep.ok and rep.version == 1 and rep.max_abs_diff <= 1e-4
    assert rep.audit and rep.audit["modules"] > 100 and rep.audit["from_env"] > 0
    root = verify_root_names(res.archive)
    assert not any(n.startswith(f"{res.root}/env/lib/python3.11/site-packages/torch/") for n in root)
    assert any(n.startswith(f"{res.root}/env/lib/python3.11/site-packages/onnxruntime/") for n in root)


def test_an_old_layout_service_packs_and_passes_verify(demo_registry, tmp_path, repo_root, extract_dir):
    """A folder an older Kit generated (the app in wsgi.py, no app.py), packed by this Kit: run.sh starts
    wsgi:app and the import audit imports wsgi (either would fail on app). onnxruntime: the small archive."""
    import tarfile

    from kit.pack import verify_archive
    from kit.servicegen import generate

    registry, mv = demo_registry
    # named as the other test's onnxruntime service: the same environment layer (.cache/pack-layers keeps 3)
    svc = to_legacy_layout(generate("demo-ort", mv.name, registry=registry.root, out_dir=tmp_path / "services",
                                    workers=1, backend="onnxruntime", trusted_keys=registry.keyring.service_keys()))
    res = pack(svc, out_dir=tmp_path / "dist", keyring=registry.keyring, cache_dir=repo_root / ".cache" / "pack-layers")
    with tarfile.open(res.archive, "r:gz") as tf:
        run_sh = tf.extractfile(f"{res.root}/run.sh").read().decode()  # type: ignore[union-attr]
    assert 'gunicorn --config gunicorn.conf.py wsgi:app' in run_sh
    trusted = tuple(k.text() for k in registry.keyring.trust().keys)
    rep = verify_archive(res.archive, trusted_keys=trusted, workdir=extract_dir)
    assert rep.ok and rep.version == 1 and rep.audit and rep.audit["modules"] > 100


def verify_root_names(archive) -> list[str]:
    import tarfile

    with tarfile.open(archive, "r:gz") as tf:
        return tf.getnames()


def test_verify_names_the_module_of_a_needed_distribution_that_was_excluded(demo_registry, tmp_path, repo_root, extract_dir):
    """A needed distribution excluded (pack.toml): the archive is written, but kit pack --verify fails and
    names the missing module, the distribution left out and the fix."""
    from kit.errors import PackError
    from kit.pack import verify_archive
    from kit.servicegen import generate

    registry, mv = demo_registry
    svc = generate("demo-ort", mv.name, registry=registry.root, out_dir=tmp_path / "services", workers=1,
                   backend="onnxruntime", trusted_keys=registry.keyring.service_keys())
    (svc / "pack.toml").write_text('[pack]\nexclude = ["orjson"]\n')
    res = pack(svc, out_dir=tmp_path / "dist", keyring=registry.keyring,
               cache_dir=repo_root / ".cache" / "pack-layers")
    assert res.left_out["orjson"] == "excluded by pack.toml / --exclude"
    trusted = tuple(k.text() for k in registry.keyring.trust().keys)
    with pytest.raises(PackError) as err:
        verify_archive(res.archive, trusted_keys=trusted, timeout=120, workdir=extract_dir)
    msg = str(err.value)
    assert "imports orjson" in msg and "distribution orjson was left out (excluded by pack.toml" in msg, msg
    assert "[pack] include" in msg
