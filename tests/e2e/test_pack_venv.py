"""`make pack` as it runs here: the real generated service, the real (venv) environment with torch, the
demo model; extracted in another directory, run by run.sh, predictions compared with the registry's.

The environment layer (~550 MB compressed, ~70 s to write) is cached in .cache/pack-layers keyed by a stat
of every file of the environment, kit's installed files and the archive root, so a warm run re-packs in
seconds; extraction (~30 s) and start-up happen every run.
The venv fallback needs the same interpreter at the same path: true here (one machine), so a second host
is not exercised; the refusal when it is missing is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from kit_testing import to_legacy_layout

from kit._proc import free_port, stop_group
from kit.pack import integrity, pack
from kit.pack.verify import _http, wait_ready
from kit.signing import KeyStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def demo_service(tmp_path, registered):
    from kit.servicegen import generate

    registry, mv = registered
    registry.promote(mv.name, mv.version, force=True, why="test")  # gates are the gate area's; forced here
    svc = generate("demo", mv.name, registry=registry.root, out_dir=tmp_path / "services",
                   trusted_keys=registry.keyring.service_keys())  # [trust]: the key that signed the model
    return registry, mv, svc


def test_venv_pack_runs_elsewhere_and_predicts_like_the_registry(demo_service, tmp_path, repo_root, digits_model):
    registry, mv, svc = demo_service
    lines: list[str] = []
    res = pack(svc, out_dir=tmp_path / "dist", progress=lines.append, cache_dir=repo_root / ".cache" / "pack-layers",
               keyring=registry.keyring)
    print(f"\nvenv archive {res.size_bytes / 1e6:.0f} MB, env {res.env_bytes / 1e9:.2f} GB, {res.seconds:.1f}s, "
          f"layer cached: {res.layer_cached}, {res.timings}")
    assert res.archive.name == "demo-v1-linux-x86_64.tar.gz" and res.kind == "venv"
    assert res.models == {"demo-digits": [1]} and not res.forced
    assert any("size report" in line for line in lines)
    assert res.signed_by == registry.keyring.signer().key_id and res.checked_files > 10_000
    # The server: another directory, only the archive and the two files beside it; the packer's PEM key put
    # there out of band. It runs exactly the steps `kit pack` prints (the key's path replaced): openssl and
    # sha256sum check the archive before tar extracts it, then run.sh starts with the same key as KIT_TRUST.
    server = tmp_path / "server"
    server.mkdir()
    pem = tmp_path / "packer.pem"
    pem.write_text(registry.keyring.signer().public.pem())
    for suffix in ("", ".sha256", ".sha256.sig"):
        shutil.move(str(res.archive) + suffix, server)
    archive = server / res.archive.name
    steps = integrity.ship_text(archive, res.root, res.signed_by).split("Then, on the server:\n", 1)[1]
    steps = steps.replace(integrity.SERVER_TRUST, str(pem))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    # A carrier's archive: its .sha256 rewritten and signed by a key of its own: refused before extracting.
    forged = tmp_path / "forged"
    forged.mkdir()
    os.link(archive, forged / archive.name)
    attacker = KeyStore(tmp_path / "attacker").new()
    integrity.sign_archive(forged / archive.name, attacker)
    out = subprocess.run(["bash", "-c", steps], cwd=forged, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "Signature Verification Failure" in out.stdout + out.stderr, out
    assert not (forged / res.root).exists(), "extracted before its signature was checked"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    t = time.monotonic()
    with open(log, "ab") as logf:
        proc = subprocess.Popen(["bash", "-c", steps], cwd=server, env=dict(env, KIT_BIND=f"127.0.0.1:{port}"),
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    root = server / res.root
    try:
        wait_ready(url, proc, 300, log)
        print(f"ready {time.monotonic() - t:.1f}s after the ship steps started (check, extract, run.sh)")
        assert not list((root / "env").glob("lib/python*/site-packages/__editable__*")), "editable kit was packed"
        assert list((root / "env").glob("lib/python*/site-packages/kit/serving"))
        _model, split, _acc = digits_model
        loaded = registry.load(mv.name, mv.version)
        import torch

        x = split.x_test[:64]
        expected = loaded(torch.from_numpy(x)).detach().numpy()
        t = time.monotonic()
        status, body = _http(url + "/predict", {"inputs": x.tolist()})
        print(f"first answer {time.monotonic() - t:.3f}s")
        assert status == 200, body
        assert body["model_version"] == 1
        np.testing.assert_allclose(np.asarray(body["outputs"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
        ex_in, ex_out = loaded.example_inputs[0].numpy(), loaded.reference_outputs[0].numpy()
        status, body = _http(url + "/predict", {"inputs": ex_in.tolist()})
        np.testing.assert_allclose(np.asarray(body["outputs"], dtype=np.float32), ex_out, rtol=1e-5, atol=1e-6)
    finally:
        stop_group(proc, timeout=30, whole_group=True)
    text = log.read_text()
    assert "Signature Verified Successfully" in text and f"{archive.name}: OK" in text, text[-2000:]
    assert "verified" in text and "environment as packed" in text, text[-2000:]
    assert "signed by a trusted key" in text and "nothing added" in text, text[-2000:]
    assert "RuntimeWarning" not in text, text[-2000:]  # python -m kit.pack (runpy warned for kit.pack.runtime)

    kit_paths = [p for p in (root / "env").rglob("kit/__init__.py")]
    assert kit_paths and all(p.is_relative_to(root / "env") for p in kit_paths)

    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # the HOME run.sh kept its key under
    for _ in range(2):  # the start-up file check alone: the first start sealed the tree it checked
        t = time.monotonic()
        out = subprocess.run([str(root / "run.sh"), "unpack"], capture_output=True, text=True, env=clean)
        print(f"run.sh file check (untouched, sealed, {res.checked_files} files) {time.monotonic() - t:.1f}s")
        assert out.returncode == 0 and "sealed tree unchanged" in out.stderr, out.stderr
    assert "torch" in res.shipped and "jupyterlab" in res.left_out and "pytest" in res.left_out
    # systemd unit for this location passes systemd-analyze where it exists (no systemd PID 1 here to start it).
    unit = subprocess.run([str(root / "run.sh"), "systemd-unit"], capture_output=True, text=True, env=clean, check=True)
    assert f'ExecStart="{root}/run.sh" start' in unit.stdout
    if shutil.which("systemd-analyze"):
        (tmp_path / "kit-demo.service").write_text(unit.stdout)
        chk = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kit-demo.service")],
                             capture_output=True, text=True)
        assert chk.returncode == 0, chk.stderr

    # An edited module in env/ and an added .pth are refused before any interpreter of the archive starts.
    app = next((root / "env").glob("lib/python*/site-packages/kit/serving/asgi.py"))
    original = app.read_bytes()
    app.write_bytes(original + b"\nimport os  # edited\n")
    t = time.monotonic()
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    print(f"run.sh verify (every file checked) {time.monotonic() - t:.1f}s")
    assert out.returncode == 1 and "kit/serving/asgi.py: sha256 differs" in out.stderr, out.stderr
    app.write_bytes(original)
    pth = app.parents[2] / "zz-evil.pth"
    pth.write_text("import os; os.system('touch /tmp/kit-pack-pth-ran')\n")
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "zz-evil.pth" in out.stderr and "were not packed" in out.stderr, out.stderr
    pth.unlink()
    # serving wrote nothing into the archive (no __pycache__ either): it verifies again as packed
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 0, out.stderr

    # A tampered model file is caught by run.sh before gunicorn starts.
    model_file = root / "registry" / "demo-digits" / "versions" / "1" / "model.pt2"
    model_file.write_bytes(model_file.read_bytes() + b"x")
    out = subprocess.run([str(root / "run.sh"), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "model.pt2" in out.stderr and "sha256" in out.stderr, out.stderr

    # The venv fallback needs its interpreter at the same path: a clear refusal when it is not there.
    alt = root / "run-elsewhere.sh"
    alt.write_text((root / "run.sh").read_text().replace(f'BASE_PYTHON="{sys.base_prefix}', 'BASE_PYTHON="/nonexistent'))
    alt.chmod(0o755)
    out = subprocess.run([str(alt), "verify"], capture_output=True, text=True, env=clean)
    assert out.returncode == 1 and "/nonexistent" in out.stderr
    assert "needs Python" in out.stderr and "conda" in out.stderr, out.stderr


def test_kit_pack_verify_command(demo_service, tmp_path, repo_root, kit_env):
    """`kit pack services/demo --verify`: pack (env layer cached), unpack in tmp, serve, /readyz, example, stop.

    The service requires an API key (as the demo's does): the verifier must get in with a one-time key of
    its own, since the service stores only digests.
    """
    from kit.servicegen import generate
    from kit.serving.security import hash_key

    registry, mv, svc = demo_service
    generate("demo", mv.name, registry=registry.root, out_dir=svc.parent, force=True,
             api_keys_sha256=[hash_key("the-operators-secret")])
    env = dict(kit_env, KIT_REGISTRY=str(registry.root))
    cmd = [sys.executable, "-c", "from kit.cli import main; main()", "pack", str(svc), "--out",
           str(tmp_path / "dist"), "--verify", "--json"]
    # the CLI caches layers next to the archive; seed that cache from the shared one to stay warm
    shared = repo_root / ".cache" / "pack-layers"
    (tmp_path / "dist" / ".layers").mkdir(parents=True)
    for p in shared.glob("env-*") if shared.is_dir() else ():  # each layer and its digests (.sha256.json)
        os.link(p, tmp_path / "dist" / ".layers" / p.name)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout)
    print(f"\n--verify: {result['verify']['unpack_seconds']}s unpack, {result['verify']['ready_seconds']}s to ready, "
          f"{result['verify']['first_answer_seconds']}s first answer")
    assert result["verify"]["ok"] and result["verify"]["version"] == 1
    assert result["verify"]["max_abs_diff"] <= 1e-5
    assert "packing the venv" in out.stderr or "reusing" in out.stderr


def test_an_onnxruntime_archive_ships_no_torch_and_passes_verify(demo_service, tmp_path, repo_root):
    """The onnxruntime backend's archive: no torch (nor anything only torch needs), kit pack --verify's
    checks pass (served from the unpacked archive, the stored example, the import audit) and the
    fingerprint run.sh compares is that of exactly what was shipped."""
    from kit.pack import verify_archive
    from kit.servicegen import generate

    registry, mv, _svc = demo_service
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
    rep = verify_archive(res.archive, trusted_keys=trusted)
    assert rep.ok and rep.version == 1 and rep.max_abs_diff <= 1e-4
    assert rep.audit and rep.audit["modules"] > 100 and rep.audit["from_env"] > 0
    root = verify_root_names(res.archive)
    assert not any(n.startswith(f"{res.root}/env/lib/python3.11/site-packages/torch/") for n in root)
    assert any(n.startswith(f"{res.root}/env/lib/python3.11/site-packages/onnxruntime/") for n in root)


def test_an_old_layout_service_packs_and_passes_verify(demo_service, tmp_path, repo_root):
    """A folder an older Kit generated (the app in wsgi.py, no app.py), packed by this Kit: run.sh starts
    wsgi:app and the import audit imports wsgi (either would fail on app). onnxruntime: the small archive."""
    import tarfile

    from kit.pack import verify_archive
    from kit.servicegen import generate

    registry, mv, _svc = demo_service
    svc = to_legacy_layout(generate("demo-old", mv.name, registry=registry.root, out_dir=tmp_path / "services",
                                    workers=1, backend="onnxruntime", trusted_keys=registry.keyring.service_keys()))
    res = pack(svc, out_dir=tmp_path / "dist", keyring=registry.keyring, cache_dir=repo_root / ".cache" / "pack-layers")
    with tarfile.open(res.archive, "r:gz") as tf:
        run_sh = tf.extractfile(f"{res.root}/run.sh").read().decode()  # type: ignore[union-attr]
    assert 'gunicorn --config gunicorn.conf.py wsgi:app' in run_sh
    trusted = tuple(k.text() for k in registry.keyring.trust().keys)
    rep = verify_archive(res.archive, trusted_keys=trusted)
    assert rep.ok and rep.version == 1 and rep.audit and rep.audit["modules"] > 100


def verify_root_names(archive) -> list[str]:
    import tarfile

    with tarfile.open(archive, "r:gz") as tf:
        return tf.getnames()


def test_verify_names_the_module_of_a_needed_distribution_that_was_excluded(demo_service, tmp_path, repo_root):
    """A needed distribution excluded (pack.toml): the archive is written, but kit pack --verify fails and
    names the missing module, the distribution left out and the fix."""
    from kit.errors import PackError
    from kit.pack import verify_archive
    from kit.servicegen import generate

    registry, mv, _svc = demo_service
    svc = generate("demo-ort", mv.name, registry=registry.root, out_dir=tmp_path / "services", workers=1,
                   backend="onnxruntime", trusted_keys=registry.keyring.service_keys())
    (svc / "pack.toml").write_text('[pack]\nexclude = ["orjson"]\n')
    res = pack(svc, out_dir=tmp_path / "dist", keyring=registry.keyring,
               cache_dir=repo_root / ".cache" / "pack-layers")
    assert res.left_out["orjson"] == "excluded by pack.toml / --exclude"
    trusted = tuple(k.text() for k in registry.keyring.trust().keys)
    with pytest.raises(PackError) as err:
        verify_archive(res.archive, trusted_keys=trusted, timeout=120)
    msg = str(err.value)
    assert "imports orjson" in msg and "distribution orjson was left out (excluded by pack.toml" in msg, msg
    assert "[pack] include" in msg
