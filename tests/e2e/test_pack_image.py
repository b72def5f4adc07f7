"""`kit pack --image` for real with Debian's buildah (rootful, vfs storage in a temporary root, no registry).

No image registry is reachable here, so the base image is made locally from this machine's own files: the
Debian packages run.sh uses (bash, coreutils, findutils, sed, grep, mawk), the shared libraries the packed
environment links against, and the Python the venv archive needs at its original path (the archive is a venv
here: no conda on this machine). Then:
- the real archive of a real service is built into an image and saved as a docker-archive in dist/;
- the image's config (non-root user, exposed port from service.toml, HEALTHCHECK on /readyz, run.sh
  entrypoint) is inspected after `podman load` into a separate store, and its app layer is read;
- the image's filesystem is run for real: run.sh start inside it (buildah run, chroot isolation, host
  network), then /readyz and the stored example over HTTP.
What this machine cannot exercise is printed and not asserted: `podman run` needs an OCI runtime (crun)
that can create namespaces and cgroups here; without it no HEALTHCHECK is executed by a runtime either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import torch

from kit._proc import free_port, stop_group, wait_http
from kit.demo import DigitsMLP
from kit.pack import pack
from kit.pack.image import APP_UID, build_image
from kit.registry import Registry
from kit.servicegen import generate

BUILDAH, PODMAN = shutil.which("buildah"), shutil.which("podman")
pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1500),
              pytest.mark.skipif(BUILDAH is None, reason="Debian's buildah is not installed (make fleet-deps)")]
MODEL = "img-digits"
TOOLS = ("bash", "coreutils", "findutils", "sed", "grep", "mawk")


def _dpkg_files(packages: tuple[str, ...]) -> set[str]:
    out = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True, check=True).stdout
    return {p for p in out.splitlines() if p.startswith("/") and os.path.isfile(p) and "/share/" not in p}


def _needed_libs(files: list[str], inside: Path) -> set[str]:
    """System libraries (outside ``inside``) that these executables and shared objects load."""
    libs: set[str] = set()
    for i in range(0, len(files), 200):
        res = subprocess.run(["ldd", *files[i:i + 200]], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            parts = line.split("=>")
            path = (parts[1] if len(parts) > 1 else parts[0]).strip().split(" (")[0].strip()
            if path.startswith("/") and not path.startswith(str(inside)) and os.path.exists(path):
                libs.add(path)
    return libs


def _ok(cmd: list[str], timeout: float = 900) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd[:8])} ... failed ({res.returncode}): {res.stderr[-2000:]}"
    return res.stdout


def _make_base(buildah: list[str], root: Path, interpreter: str | None, tag: str) -> None:
    """A base image from this machine's files (see the module docstring): the tools run.sh uses, the
    libraries ``root``'s shared objects need, and ``interpreter`` with its standard library (a venv's)."""
    files = _dpkg_files(TOOLS)
    py_home = Path(interpreter).resolve().parents[1] if interpreter else None  # .../versions/3.11.7
    if interpreter and py_home:
        stdlib = py_home / "lib" / f"python{Path(interpreter).name.removeprefix('python')}"
        for p in [*py_home.glob("bin/python3*"), *py_home.glob("lib/libpython*")]:
            files.add(str(p))
        for p in stdlib.rglob("*"):
            rel = p.relative_to(stdlib).parts
            if p.is_file() and rel and rel[0] not in ("site-packages", "test", "idlelib", "tkinter", "ensurepip"):
                files.add(str(p))
    files.add(os.path.realpath("/usr/bin/awk"))  # run.sh calls awk: Debian's alternatives link to mawk
    files.add("/usr/bin/awk")
    elf = [f for f in files if "/bin/" in f or ".so" in f]  # the tools, the interpreter, lib-dynload modules
    files |= _needed_libs(elf + [str(p) for p in root.rglob("*.so*") if p.is_file()], root)
    ctr = subprocess.run([*buildah, "from", "scratch"], capture_output=True, text=True, check=True).stdout.strip()
    mnt = Path(subprocess.run([*buildah, "mount", ctr], capture_output=True, text=True, check=True).stdout.strip())
    assert mnt.is_dir() and mnt != Path("/"), mnt
    for d in ("usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "etc", "opt/kit", "dev", "proc", "sys"):
        (mnt / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{link}", mnt / link)
    (mnt / "tmp").mkdir(mode=0o1777)
    os.chmod(mnt / "tmp", 0o1777)
    (mnt / "etc" / "passwd").write_text(f"root:x:0:0::/root:/bin/bash\napp:x:{APP_UID}:{APP_UID}::/opt/kit:/bin/bash\n")
    (mnt / "etc" / "group").write_text(f"root:x:0:\napp:x:{APP_UID}:\n")
    for f in sorted(files):
        real_parent = Path(os.path.realpath(os.path.dirname(f)))
        dest = mnt / real_parent.relative_to("/") / os.path.basename(f)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copy2(f, dest)  # follows links: a library's soname link arrives as the file itself
    for parent in py_home.parents if py_home else ():  # /root is 0700 here: the app user must reach Python
        if parent != Path("/") and (mnt / parent.relative_to("/")).is_dir():
            os.chmod(mnt / parent.relative_to("/"), 0o755)
    subprocess.run([*buildah, "umount", ctr], check=True, capture_output=True)
    subprocess.run([*buildah, "commit", "--rm", ctr, tag], check=True, capture_output=True)


@pytest.fixture
def stores(tmp_path):
    """buildah/podman storage in temporary folders (vfs: no overlay mounts needed)."""
    store = tmp_path / "storage"
    run = tempfile.mkdtemp(prefix="kit-rr-")  # podman refuses a runroot longer than 50 characters
    args = ["--root", str(store / "root"), "--runroot", run, "--storage-driver", "vfs"]
    yield args
    for tool in (BUILDAH, PODMAN):
        if tool:
            subprocess.run([tool, *args, "rm", "--all"], capture_output=True)
    if BUILDAH:
        subprocess.run([BUILDAH, *args, "rmi", "--all", "--force"], capture_output=True)
    subprocess.run(["umount", "-R", str(store)], capture_output=True)  # leftovers of chroot runs, if any
    subprocess.run(["rm", "-rf", "--one-file-system", str(store), run], capture_output=True)


def test_pack_image_builds_inspects_and_serves(tmp_path, repo_root, stores):
    reg = Registry(tmp_path / "registry", require_gate=True, user="image-test")
    torch.manual_seed(1)
    reg.register(MODEL, DigitsMLP().eval(), torch.rand(2, 64, generator=torch.Generator().manual_seed(0)))
    reg.promote(MODEL, 1, force=True, why="test")  # gates are tested in their own area
    port = free_port()
    svc = generate("imgsvc", MODEL, registry=reg.root, out_dir=tmp_path / "services", workers=1,
                   bind=f"127.0.0.1:{port}")
    t0 = time.monotonic()
    res = pack(svc, out_dir=tmp_path / "dist", cache_dir=repo_root / ".cache" / "pack-layers")
    t_pack = time.monotonic() - t0
    buildah = [BUILDAH, *stores]

    manifest = json.loads(subprocess.run(["tar", "-xzOf", str(res.archive), f"{res.root}/kit-pack.json"],
                                         capture_output=True, check=True).stdout)
    base = "localhost/kit-test-base:1"
    t0 = time.monotonic()
    if res.kind == "venv":
        _make_base(buildah, Path(sys.prefix), manifest["base_interpreter"], base)  # the env that was packed
    else:  # a conda archive carries its interpreter and most libraries (not exercised here: no conda)
        _make_base(buildah, Path(sys.prefix), None, base)
    t_base = time.monotonic() - t0

    img = build_image(res.archive, base=base, builder="buildah", builder_args=stores)
    assert img.image_archive is not None and img.image_archive.parent == res.archive.parent, img
    assert img.containerfile == img.context / "Containerfile" and (img.context / res.root / "run.sh").is_file()
    text = img.containerfile.read_text()
    assert f"EXPOSE {port}/tcp" in text and f"USER {APP_UID}:{APP_UID}" in text and "/readyz" in text

    # the saved archive, loaded by podman into a separate store, keeps the config
    if PODMAN:
        load_store = tmp_path / "podman"
        pargs = [PODMAN, "--root", str(load_store / "root"), "--runroot", stores[3] + "-load",
                 "--storage-driver", "vfs"]
        _ok([*pargs, "load", "-i", str(img.image_archive)])
        info = json.loads(_ok([*pargs, "image", "inspect", img.tag]))[0]
        cfg = info["Config"]
        assert cfg["User"] == f"{APP_UID}:{APP_UID}"
        assert f"{port}/tcp" in cfg["ExposedPorts"]
        assert cfg["Entrypoint"] == [f"/opt/kit/{res.root}/run.sh"] and cfg["Cmd"] == ["start"]
        health = info.get("Healthcheck") or cfg.get("Healthcheck") or {}
        assert any("/readyz" in part for part in health.get("Test", [])), health
        subprocess.run([*pargs, "rmi", "--all", "--force"], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(load_store), stores[3] + "-load"], capture_output=True)
    else:
        print("\nnot exercised: podman load (podman is not installed)")

    # the app layer: the pack folder, owned by the app user, run.sh executable
    with tarfile.open(img.image_archive) as outer:
        layers = json.load(outer.extractfile("manifest.json"))[0]["Layers"]  # type: ignore[arg-type]
        with tarfile.open(fileobj=outer.extractfile(layers[-1])) as layer:  # type: ignore[arg-type]
            run_sh = layer.getmember(f"opt/kit/{res.root}/run.sh")
    assert run_sh.uid == APP_UID and run_sh.mode & 0o111

    # run the image's filesystem for real: its entrypoint, as its user, on the host network
    ctr = _ok([*buildah, "from", img.tag]).strip()
    serve_port = free_port()
    _ok([*buildah, "config", "--env", f"KIT_BIND=127.0.0.1:{serve_port}", ctr])
    log = tmp_path / "image-run.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*buildah, "run", "--isolation", "chroot", "--network", "host", "--user",
                                 f"{APP_UID}:{APP_UID}", ctr, "--", f"/opt/kit/{res.root}/run.sh", "start"],
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{serve_port}/readyz", timeout=300, process=proc, log_path=log)
        t_ready = time.monotonic() - t0
        import urllib.request

        example = reg.load(MODEL, 1, check_env=False)
        x = example.example_inputs[0][:1].tolist()
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/predict", data=json.dumps({"inputs": x}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and r.headers["X-Kit-Model-Version"] == "1"
            out = json.loads(r.read())
        want = example.module(*example.example_inputs)[:1]
        got = torch.tensor(out["outputs"])
        assert torch.allclose(got.reshape(want.shape), want.detach(), atol=1e-5)
    finally:
        stop_group(proc)
    print(f"\npack {t_pack:.0f}s, base image {t_base:.0f}s, image build+save {img.seconds:.0f}s "
          f"({img.image_archive.stat().st_size / 1e6:.0f} MB), ready inside the image after {t_ready:.1f}s")

    shutil.rmtree(tmp_path / "dist", ignore_errors=True)  # a few GB: archive, context and image
    if PODMAN:  # the one step left: a real container runtime
        run = subprocess.run([PODMAN, *stores, "run", "--rm", "--network", "host", "--entrypoint", "/bin/true",
                              img.tag], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            print("not exercised here: `podman run` (an OCI runtime starting the container, and the HEALTHCHECK "
                  f"it would run): {tail_of(run.stderr)}")


def tail_of(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1][:300]

