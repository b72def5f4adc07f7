"""A container image from a packed archive (``kit pack services/NAME --image``).

The archive is extracted into ``dist/<archive>.image/`` and a ``Containerfile`` (Dockerfile syntax) is
written next to its contents: the pack folder copied in as a non-root user (10001), ``run.sh`` as the
entrypoint (so the image checks and starts exactly what a server does), ``KIT_BIND`` on all interfaces,
the port from service.toml exposed, and a HEALTHCHECK on ``/readyz``. The Containerfile has no RUN step,
so building it needs no container runtime. Where buildah or podman is installed, the image is built and
saved as ``dist/<archive>.image.tar`` (docker-archive: ``podman load`` and ``docker load`` accept it, and
unlike an OCI image config it keeps the HEALTHCHECK).

A conda archive carries its interpreter and runs on any glibc base (default ``debian:bookworm-slim``). A
venv archive needs the very Python it was packed with at the same path, so it needs a ``base`` image that
has it; none is guessed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kit.errors import PackError
from kit.pack.runtime import MANIFEST

log = logging.getLogger(__name__)

CONTAINERFILE = "Containerfile"
DEFAULT_BASE = "debian:bookworm-slim"
APP_UID = 10001
BUILDERS = ("buildah", "podman")


@dataclass(frozen=True)
class ImageResult:
    """What :func:`build_image` wrote; ``image_archive`` is None when no builder ran (``skipped`` says why)."""

    context: Path
    containerfile: Path
    tag: str
    port: int
    image_archive: Path | None = None
    builder: str | None = None
    seconds: float = 0.0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def image_tag(service: str, label: str) -> str:
    """``localhost/kit-<service>:<label>``, lowercased and limited to the characters tags allow."""
    name = re.sub(r"[^a-z0-9._-]+", "-", service.lower()).strip("-._") or "service"
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).lstrip("-.")[:128] or "latest"
    return f"localhost/kit-{name}:{tag}"


def _port(root: Path) -> int:
    from kit.service_settings import default, read_service_toml

    toml = root / "service" / "service.toml"
    bind = str(read_service_toml(root / "service", error=PackError)["service"].get("bind", default("service", "bind")))
    port = bind.rpartition(":")[2]
    if not (port.isascii() and port.isdigit()):
        raise PackError(f"{toml}: [service] bind = {bind!r} has no port.")
    return int(port)


def containerfile_text(manifest: dict[str, Any], port: int, *, base: str | None = None) -> str:
    """The Containerfile for an extracted pack folder described by its ``kit-pack.json``."""
    root, kind = str(manifest["root"]), str(manifest.get("kind", ""))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", root):
        raise PackError(f"kit-pack.json names the folder {root!r}, which is not a plain folder name.")
    if kind == "venv":
        note = (f"# This archive holds a venv: the image needs Python {manifest.get('python')} at "
                f"{manifest.get('base_interpreter')},\n# so BASE must be an image that has it there.")
        default = base or ""
    else:
        note = "# A conda environment carries its interpreter: any glibc base will do."
        default = base or DEFAULT_BASE
    app = f"/opt/kit/{root}"
    health = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/readyz', timeout=2)"
    lines = [
        f"# The {manifest.get('service')} service ({manifest.get('label')}, {manifest.get('platform')}), "
        "written by `kit pack --image`",
        f"# next to the archive's contents ({root}/). Build it here: `buildah bud -t IMAGE .` or "
        "`docker build -t IMAGE .`",
        note,
        f"ARG BASE={default}",
        "FROM ${BASE}",
        f"COPY --chown={APP_UID}:{APP_UID} {root}/ {app}/",
        f"WORKDIR {app}",
        "# not root; run.sh relocates the environment on first start, so the folder is the app user's; it keeps the",
        "# key of its record of that (conda) in KIT_STATE_DIR, and the verified copies of the models workers map in",
        "# KIT_CACHE_DIR, both outside the folder and writable by that user (the user has no home folder)",
        f"USER {APP_UID}:{APP_UID}",
        f"ENV KIT_BIND=0.0.0.0:{port} PYTHONDONTWRITEBYTECODE=1 KIT_STATE_DIR=/tmp/kit-state KIT_CACHE_DIR=/tmp/kit-cache",
        f"EXPOSE {port}/tcp",
        "# ready = a model is loaded (the same /readyz nginx and Kubernetes probe); start-period covers the load",
        f"HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 CMD "
        f"{json.dumps([f'{app}/env/bin/python', '-c', health])}",
        f'LABEL org.opencontainers.image.title="kit-{manifest.get("service")}" '
        f'org.opencontainers.image.version="{manifest.get("label")}"',
        f"ENTRYPOINT {json.dumps([f'{app}/run.sh'])}",
        'CMD ["start"]',
    ]
    return "\n".join(lines) + "\n"


def write_context(archive: Path, out_dir: Path, *, base: str | None = None) -> tuple[Path, dict[str, Any], int]:
    """Extract ``archive`` into ``out_dir/<archive>.image/`` and write the Containerfile there.

    Returns (context folder, the archive's manifest, the service port). The folder is replaced whole.
    """
    from kit.pack.verify import extract

    stem = archive.name.removesuffix(".tar.gz").removesuffix(".tar.zst")
    context = out_dir / f"{stem}.image"
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.image-", dir=out_dir))
    try:
        root = extract(archive, tmp)
        manifest = json.loads((root / MANIFEST).read_text())
        manifest.setdefault("root", root.name)
        port = _port(root)
        (tmp / CONTAINERFILE).write_text(containerfile_text(manifest, port, base=base))
        if context.exists():
            shutil.rmtree(context)
        os.replace(tmp, context)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return context, manifest, port


def _run(cmd: Sequence[str], what: str, timeout: float) -> None:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise PackError(f"{what} failed (exit {res.returncode}): {' '.join(cmd[:6])} ...\n{tail}")


def build_image(archive: Path | str, *, out_dir: Path | str | None = None, base: str | None = None,
                builder: str | None = None, builder_args: Sequence[str] = (), timeout: float = 1800.0,
                progress: Callable[[str], None] | None = None) -> ImageResult:
    """Write the image context of a packed ``archive`` and, where buildah or podman is installed, build it
    into ``<out_dir>/<archive>.image.tar`` (docker-archive).

    ``builder``: "buildah" or "podman" (default: the first installed); ``builder_args`` go before the
    subcommand (e.g. ``--storage-driver vfs --root DIR``). ``base`` overrides the Containerfile's BASE.
    """
    archive = Path(archive).resolve()
    out = Path(out_dir).resolve() if out_dir else archive.parent
    say = progress or (lambda _msg: None)
    if builder is not None and builder not in BUILDERS:
        raise PackError(f"Unknown image builder {builder!r}; use one of {', '.join(BUILDERS)}.")
    t0 = time.monotonic()
    say(f"writing the image context of {archive.name}")
    context, manifest, port = write_context(archive, out, base=base)
    tag = image_tag(str(manifest.get("service")), str(manifest.get("label")))
    result = ImageResult(context=context, containerfile=context / CONTAINERFILE, tag=tag, port=port)
    tool = builder or next((b for b in BUILDERS if shutil.which(b)), None)
    if tool is None or not shutil.which(tool):
        return _skipped(result, f"{builder or 'buildah or podman'} is not installed; build the image from "
                                f"{context} with `docker build -t {tag} .` or install buildah.", t0)
    if manifest.get("kind") == "venv" and not base:
        return _skipped(result, f"the archive holds a venv, which needs Python {manifest.get('python')} at "
                                f"{manifest.get('base_interpreter')} inside the image: pass a base image that "
                                "has it (--base), or pack from a conda environment.", t0)
    image_archive = out / f"{context.name}.tar"
    tmp_archive = image_archive.with_name(f".{image_archive.name}.{os.getpid()}.tmp")
    tmp_archive.unlink(missing_ok=True)
    build_args = ["--build-arg", f"BASE={base}"] if base else []
    say(f"building {tag} with {tool}")
    if tool == "buildah":
        _run([tool, *builder_args, "bud", "--format", "docker", *build_args, "-f", CONTAINERFILE, "-t", tag,
              str(context)], "buildah bud", timeout)
        _run([tool, *builder_args, "push", tag, f"docker-archive:{tmp_archive}:{tag}"], "buildah push", timeout)
    else:
        _run([tool, *builder_args, "build", "--format", "docker", *build_args, "-f",
              str(context / CONTAINERFILE), "-t", tag, str(context)], "podman build", timeout)
        _run([tool, *builder_args, "save", "--format", "docker-archive", "-o", str(tmp_archive), tag],
             "podman save", timeout)
    os.replace(tmp_archive, image_archive)
    seconds = time.monotonic() - t0
    say(f"wrote {image_archive} ({image_archive.stat().st_size / 1e6:.0f} MB) in {seconds:.0f}s")
    return ImageResult(context=context, containerfile=context / CONTAINERFILE, tag=tag, port=port,
                       image_archive=image_archive, builder=tool, seconds=seconds)


def _skipped(result: ImageResult, why: str, t0: float) -> ImageResult:
    log.warning("image not built: %s", why)
    return ImageResult(context=result.context, containerfile=result.containerfile, tag=result.tag,
                       port=result.port, seconds=time.monotonic() - t0, skipped=why)
