"""``kit registry check``: can this machine, with these credentials, read (and with ``write``, write) the
registry, and does its storage give the guarantees Kit builds on? One :class:`Finding` per check, each
failure with the fix (the IAM action, the setting, the store feature).

A bucket (``s3://bucket/prefix``): where the credentials came from; LIST (a reader's ``s3:ListBucket``); GET
of one version's meta.json and the same GET with ``If-None-Match: <etag>`` (a 304 is what makes a 0.5 s
poll cheap); with ``write``: a create of a new probe object under ``_uploads/`` (``s3:PutObject``), a second
create of it that must be refused (``If-None-Match: *`` honoured: without it two writers could take one
version number), its delete (``s3:DeleteObject`` on ``_uploads/*``), and whether big uploads can resume.
A folder: that it exists, what filesystem holds it (object-store FUSE mounts are refused: they emulate the
exclusive link and the rename the folder registry relies on), and with ``write`` an exclusive link made twice.
Nothing a check writes is left behind, and nothing is read twice or executed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kit.errors import ConfigError, KitError
from kit.registry.names import NAME_RE, is_version_text

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_META_MAX = 1 << 20
# FUSE filesystems that put a bucket behind a path: no atomic rename, no exclusive link (docs/fleet.md)
OBJECT_FUSE = ("fuse.s3fs", "fuse.gcsfuse", "fuse.blobfuse", "fuse.blobfuse2", "fuse.goofys", "fuse.rclone",
                "fuse.mountpoint-s3", "fuse.juicefs")


_FS_CHECKED: set[Path] = set()  # registry folders this process found on a filesystem it may write


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def check_registry(location: str | os.PathLike[str], write: bool = False) -> list[Finding]:
    """The findings for the registry at ``location`` (a folder or ``s3://bucket/prefix``)."""
    from kit.registry.storage import is_url

    if is_url(location):
        return _check_bucket(str(location), write)
    return _check_folder(Path(location), write)


def _line(exc: BaseException) -> str:
    """An error's first line, printable (a store's error text is its own: no terminal escapes pass)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "".join(c if c.isprintable() else "?" for c in text[:300])


# ---- a bucket
def _check_bucket(url: str, write: bool) -> list[Finding]:
    from kit.registry.s3 import S3Storage, aws_settings, parse_s3_url

    try:
        bucket, prefix = parse_s3_url(url)
        settings = aws_settings()
    except KitError as exc:
        return [Finding("settings", FAIL, _line(exc), "Fix the URL or the AWS settings named above.")]
    out = [Finding("settings", OK, _settings_source(settings))]
    st = S3Storage(bucket, prefix, settings, timeout_s=10.0)
    where = f"arn:aws:s3:::{bucket}" + (f" with s3:prefix {prefix}/*" if prefix else "")
    try:
        models = [m for m in st.folders("") if NAME_RE.fullmatch(m)]  # a hostile name is not printed
    except KitError as exc:
        return [*out, Finding("list", FAIL, _line(exc), f"A reader needs s3:ListBucket on {where}; check the "
                              "endpoint, the bucket name and that the key pair is valid.")]
    out.append(Finding("list", OK, f"{len(models)} model(s)" + (f": {', '.join(models[:8])}" if models else "")))
    out += _read_checks(st, models, bucket, prefix)
    if write:
        out += _write_checks(st, bucket, prefix)
    return out


def _settings_source(settings: dict[str, str]) -> str:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID"):
        creds = "static key from AWS_ACCESS_KEY_ID"
    elif settings.get("access_key_id"):
        creds = f"static key from the shared files, profile {env.get('AWS_PROFILE') or 'default'}"
    else:
        creds = "no static key: obstore's chain (web identity, ECS task role, EC2 instance metadata)"
    return f"{creds}; region {settings.get('region')}; endpoint {settings.get('endpoint') or 'AWS'}"


def _read_checks(st: Any, models: list[str], bucket: str, prefix: str) -> list[Finding]:
    from kit.registry.storage import NotModified

    arn = f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}*"
    try:
        key = next((f"{m}/versions/{v}/meta.json" for m in models
                    for v in [v for v in st.folders(f"{m}/versions") if is_version_text(v)][:1]), None)
        if key is None:
            return [Finding("read", SKIP, "no version to read yet"),
                    Finding("conditional GET", SKIP, "nothing to poll")]
        got = st.get(key, _META_MAX)
        again = st.get_if_changed(key, got.etag, _META_MAX) if got is not None else None
    except KitError as exc:
        return [Finding("read", FAIL, f"{key}: {_line(exc)}", f"A reader needs s3:GetObject on {arn}.")]
    if got is None:
        return [Finding("read", FAIL, f"{key} was listed but cannot be read", f"A reader needs s3:GetObject on {arn}.")]
    poll = (Finding("conditional GET", OK, "If-None-Match: <etag> answered 304: a poll costs no body")
            if isinstance(again, NotModified) else
            Finding("conditional GET", WARN, "the store sent the whole object again for If-None-Match: <etag>",
                    "Services still work; each poll downloads aliases.json (raise [watch] interval on a big fleet)."))
    return [Finding("read", OK, f"{key} ({len(got.data)} bytes)"), poll]


def _write_checks(st: Any, bucket: str, prefix: str) -> list[Finding]:
    from kit.registry.s3parts import STAGING

    arn = f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}"
    try:
        key, first, second, undeleted = st.probe_conditional_create("registry-check")
    except ConfigError as exc:  # the store answered the conditional PUT with 501
        return [Finding("conditional create", FAIL, _line(exc), _NO_CONDITIONAL)]
    except KitError as exc:
        return [Finding("write", FAIL, _line(exc), f"A writer needs s3:PutObject on {arn}*.")]
    out = [Finding("write", OK, f"created {key}"),
           Finding("conditional create", OK, "a second If-None-Match: * create was refused (412)")
           if first and not second else
           Finding("conditional create", FAIL, "a second If-None-Match: * create of one object succeeded" if second
                   else "the first create of a new object was refused", _NO_CONDITIONAL),
           Finding("delete staging", OK, f"deleted {key}") if undeleted is None else
           Finding("delete staging", WARN, _line(undeleted), f"Allow s3:DeleteObject on {arn}{STAGING}/* (or let "
                   "the lifecycle rule expire staged parts: docs/fleet.md).")]
    out.append(Finding("resumable uploads", OK, "static keys: big files go as resumable staged parts")
               if st.rest is not None else
               Finding("resumable uploads", WARN, "no static key: big files go as one multipart upload that a "
                       "killed register sends again whole", "Export the keys (aws configure export-credentials "
                       "--format env) to make big uploads resumable."))
    return out


_NO_CONDITIONAL = ("Use a store release that answers 412 to PUT If-None-Match: * of an existing key (AWS S3 does; "
                   "check MinIO's, Ceph RGW's, R2's or GCS's notes) or a folder registry: Kit writes nothing here.")


# ---- a folder
def _check_folder(root: Path, write: bool) -> list[Finding]:
    root = root.expanduser().absolute()
    fstype, mount = filesystem_of(root)
    fs = (Finding("filesystem", FAIL, f"{fstype} at {mount}: an object store mounted with FUSE",
                  "Name the bucket itself (registry = \"s3://bucket/prefix\"), or use a local disk or NFS.")
          if fstype in OBJECT_FUSE else Finding("filesystem", OK, f"{fstype or 'unknown'} at {mount or '?'}"))
    if not root.is_dir():
        return [Finding("folder", FAIL, f"{root} is not a folder", "Create it (the first register does) or point "
                        "--registry / KIT_REGISTRY at the registry."), fs]
    models = sorted(p.name for p in root.iterdir() if NAME_RE.fullmatch(p.name) and (p / "versions").is_dir())
    out = [Finding("folder", OK, f"{root}: {len(models)} model(s)" + (f": {', '.join(models[:8])}" if models else "")),
           fs]
    if write:
        out.append(_exclusive_link(root))
    return out


def filesystem_of(path: Path, mountinfo: str | None = None) -> tuple[str, str]:
    """(filesystem type, mount point) of the mount holding ``path``, from /proc/self/mountinfo (Linux);
    ("", "") where that cannot be read."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "", ""
    best = ("", "")
    target = str(path.resolve())
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts, rest = left.split(), right.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (rest[0], mount)
    return best


def _exclusive_link(root: Path) -> Finding:
    probe = root / f".kit-check-{os.getpid()}-{os.urandom(6).hex()}"
    no_link = ("This filesystem lacks the exclusive create (a hard link) that moves are recorded with: use a "
               "local disk, NFS, or a bucket.")
    try:
        probe.mkdir()
        (probe / "a").write_bytes(b"1")
    except OSError as exc:
        return Finding("write", FAIL, f"{probe}: {exc.strerror or exc}", "Give this user write access to the folder.")
    try:
        os.link(probe / "a", probe / "b")
        try:
            os.link(probe / "a", probe / "b")
        except FileExistsError:
            return Finding("write", OK, "created a file and an exclusive link; a second link was refused")
        return Finding("write", FAIL, "a second exclusive link to one name succeeded", no_link)
    except OSError as exc:
        return Finding("write", FAIL, f"a hard link in {root}: {exc.strerror or exc}", no_link)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def refuse_object_fuse(root: Path) -> None:
    """Once per process and folder, before the folder registry's first write: a bucket mounted with FUSE
    (s3fs, gcsfuse, ...) emulates the rename and the exclusive create the folder registry is built on:
    ``ConfigError``."""
    if root in _FS_CHECKED:
        return
    fstype, mount = filesystem_of(root)
    if fstype in OBJECT_FUSE:
        raise ConfigError(f"The registry folder {root} is on {fstype} at {mount}, an object store mounted with "
                          "FUSE: its rename is a copy and a delete, so two writers could lose a version or a move. "
                          "Name the bucket itself (registry = \"s3://bucket/prefix\"), or use a local disk or NFS.")
    _FS_CHECKED.add(root)
