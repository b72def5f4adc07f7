"""A registry in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2, GCS's S3 interface,
SeaweedFS): ``s3://bucket/prefix``.

The client is obstore (Rust's ``object_store``): 4 ms to import and 16 MB installed against boto3's 160 ms and
34 MB, streaming GETs at disk speed, multipart PUTs built in, and the conditional requests the registry is
built from (``PUT`` ``If-None-Match: *`` as ``mode="create"``, ``GET`` ``If-None-Match: <etag>``).

Settings are taken the way the AWS tools take them (:func:`aws_settings`): ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, then the profile (``AWS_PROFILE``, else ``default``) of the
shared files (``AWS_SHARED_CREDENTIALS_FILE``/``~/.aws/credentials``, ``AWS_CONFIG_FILE``/``~/.aws/config``:
``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``region``, ``endpoint_url``).
With no static key, obstore's own chain runs (web identity, ECS, EC2 instance metadata).
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kit._io import ensure_free_space, storage_errors, syncing
from kit.errors import ConfigError, RegistryCorruptError, StorageError
from kit.registry.storage import NOT_MODIFIED, Got, NotModified, Progress, check_key

if TYPE_CHECKING:
    from kit.registry.s3list import Listed

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CHUNK = 8 << 20
_FLUSH_EVERY = 64 << 20  # bytes a download writes between background flushes
PART_SIZE = 16 << 20  # multipart part size: a 400 MB file is 25 parts sent 8 at a time
_PROBED: set[str] = set()  # the stores this process found honouring If-None-Match: * (check_conditional_create)
_PROBE_LOCK = threading.Lock()


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without a trailing slash); ``ConfigError`` otherwise."""
    m = re.fullmatch(r"s3://([^/]+)(?:/(.*))?", url)
    prefix = (m.group(2) or "").rstrip("/") if m else ""
    if m is None or not _BUCKET.fullmatch(m.group(1)) or (prefix and any(
            p in ("", ".", "..") for p in prefix.split("/"))):
        raise ConfigError(f"{url!r} is not a registry URL of the form s3://bucket/prefix (bucket: 3-63 lower-case "
                          "letters, digits, dots and dashes; prefix: plain folder names).")
    return m.group(1), prefix


def aws_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Credentials, region and endpoint as the AWS CLI and SDKs find them (see the module docstring)."""
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    creds = _ini_section(Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"), profile)
    conf = _ini_section(Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config"),
                        profile if profile == "default" else f"profile {profile}")
    out: dict[str, str] = {}
    picks = {"access_key_id": ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
             "secret_access_key": ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
             "session_token": ("AWS_SESSION_TOKEN", "aws_session_token")}
    if env.get("AWS_ACCESS_KEY_ID"):  # a key pair comes whole from one place, never mixed
        out.update({k: env[e] for k, (e, _) in picks.items() if env.get(e)})
    else:
        out.update({k: v for k, (_, f) in picks.items() if (v := creds.get(f) or conf.get(f))})
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or conf.get("region")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or conf.get("endpoint_url")
    out["region"] = region or "us-east-1"
    if endpoint:
        out["endpoint"] = endpoint
    return out


def _ini_section(path: Path, section: str) -> dict[str, str]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error, UnicodeError) as exc:
        raise ConfigError(f"{path} is not a readable AWS settings file ({exc}). Fix it or set AWS_* instead.") from exc
    return dict(parser.items(section)) if parser.has_section(section) else {}


class S3Storage:
    """A bucket prefix as :class:`kit.registry.storage.Storage`, through obstore."""

    def __init__(self, bucket: str, prefix: str, settings: Mapping[str, str], *, timeout_s: float = 30.0,
                 part_size: int = PART_SIZE):
        from obstore.store import S3Store

        from kit.registry.s3parts import STALE_STAGING, S3Rest

        self.bucket, self.prefix = bucket, prefix
        self.part_size, self.max_concurrency = part_size, 8  # a big upload's parts, and how many go at once
        self.stale_staging = STALE_STAGING  # staged parts untouched this long are an abandoned upload's
        self.sent_bytes = 0  # file bytes this object has PUT (a resumed upload sends only the missing parts)
        self._sent_lock = threading.Lock()
        self.rest = (S3Rest(bucket, prefix, settings, max(timeout_s, 60.0))  # the calls obstore does not make
                     if settings.get("access_key_id") and settings.get("secret_access_key") else None)
        self.endpoint = settings.get("endpoint", "")
        config: dict[str, object] = {k: v for k, v in settings.items() if k != "endpoint"}
        if self.endpoint:
            config["endpoint"] = self.endpoint
            config["virtual_hosted_style_request"] = False  # path style: what MinIO, Ceph, SeaweedFS serve
        client = {"allow_http": self.endpoint.startswith("http://"), "connect_timeout": timedelta(seconds=2),
                  "timeout": timedelta(seconds=timeout_s)}
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=min(timeout_s, 10))}
        self.store = S3Store(bucket, prefix=prefix or None, config=config,  # type: ignore[arg-type]
                             client_options=client, retry_config=retry)  # type: ignore[arg-type]

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str] | None = None) -> S3Storage:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, aws_settings(environ))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def identity(self) -> str:
        """What names this store on this host (the local mirror and cache folders use its digest)."""
        return f"{self.endpoint or 'aws'} {self.describe()}"

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        if what == "list" and type(exc).__name__ == "InvalidPathError":  # obstore stops at a key it cannot parse
            under = "/".join(p for p in (self.prefix, key.strip("/")) if p)
            find = f" --prefix {under}/" if under else ""
            return StorageError(
                f"The registry {self.describe()} holds, under {key}, an object whose key is not a plain path (a "
                "control character or an empty part: written by another client), and the listing stops there. "
                f"Find it with `aws s3api list-objects-v2 --bucket {self.bucket}{find} --encoding-type url` and "
                "remove it.", folder=self.describe())
        return StorageError(f"The registry {self.describe()} could not {what} {key} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Check that the store is "
                            "reachable and the AWS_* credentials allow it, then retry.", folder=self.describe())

    def get(self, key: str, max_bytes: int) -> Got | None:
        got = self.get_if_changed(key, None, max_bytes)
        assert not isinstance(got, NotModified)
        return got

    def get_if_changed(self, key: str, etag: str | None, max_bytes: int) -> Got | NotModified | None:
        import obstore
        from obstore.exceptions import NotFoundError, NotModifiedError

        try:
            res = obstore.get(self.store, check_key(key), options={"if_none_match": etag} if etag else None)
            if int(res.meta["size"]) > max_bytes:
                raise RegistryCorruptError(f"{self.describe()}/{key} is {res.meta['size']} bytes, over the "
                                           f"{max_bytes} such an object may have: refused before it is read.")
            data = bytes(res.bytes())
        except NotModifiedError:
            return NOT_MODIFIED
        except (NotFoundError, FileNotFoundError):
            return None
        except RegistryCorruptError:
            raise
        except Exception as exc:
            raise self._fail("read", key, exc) from exc
        if len(data) > max_bytes:
            raise RegistryCorruptError(f"{self.describe()}/{key} is over {max_bytes} bytes: refused.")
        return Got(data, str(res.meta.get("e_tag") or hashlib.sha256(data).hexdigest()))

    def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self.store, check_key(key), data, use_multipart=False)
        except Exception as exc:
            raise self._fail("write", key, exc) from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.check_conditional_create()
        return self._create(check_key(key), data)

    def _create(self, key: str, data: bytes) -> bool:
        """``put_if_absent`` without the once-per-process check that the store honours it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(self.store, key, data, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return False
        except Exception as exc:
            if re.search(r"status code: 501|NotImplemented", str(exc)):
                raise self._unsafe("it answers such a PUT with 501 NotImplemented") from exc
            raise self._fail("create", key, exc) from exc
        return True

    def probe_conditional_create(self, tag: str) -> tuple[str, bool, bool, StorageError | None]:
        """Create a new object under the staging prefix (the writer's delete rights and lifecycle rule cover
        it) twice with ``If-None-Match: *``, then delete it: (its key, first created, second created, the
        delete's error or None). A store honours conditional creates when the first was and the second was
        not. The first create's failure raises (``ConfigError`` for a 501, ``StorageError`` otherwise)."""
        from kit.registry.s3parts import STAGING

        key = f"{STAGING}/{tag}/{os.getpid()}-{os.urandom(8).hex()}"
        first = self._create(key, b"1")
        undeleted: StorageError | None = None
        try:
            second = self._create(key, b"2")
        finally:
            try:
                self.delete(key)
            except StorageError as exc:  # a writer denied deletes keeps it; the lifecycle rule expires it
                undeleted = exc
        return key, first, second, undeleted

    def check_conditional_create(self) -> None:
        """Once per process and store, before the first claim: :meth:`probe_conditional_create`. A store that
        lets the second create through (or refuses the first) would let two writers both take version N or
        move serial N, so nothing is claimed there: ``ConfigError``. A writer not allowed to write the staging
        prefix (a service's guard, allowed only moves) skips the check."""
        ident = self.identity()
        with _PROBE_LOCK:
            if ident in _PROBED:
                return
            try:
                _, first, second, _ = self.probe_conditional_create("conditional-create-probe")
            except StorageError as exc:
                if not re.search(r"status code: 403|AccessDenied|PermissionDenied", repr(exc.__cause__)):
                    raise
                _PROBED.add(ident)  # not retried: the writers that register (allowed there) check it
                log.warning("%s: not allowed to write its staging prefix, so its conditional creates were not "
                            "checked here (every registering writer checks them)", self.describe())
                return
            if not first or second:
                raise self._unsafe("a second create of one new object succeeded" if second else
                                   "it refused the first create of a new object")
            _PROBED.add(ident)

    def _unsafe(self, what: str) -> ConfigError:
        return ConfigError(
            f"The store behind {self.describe()} ({self.endpoint or 'AWS S3'}) does not honour conditional "
            f"creates (PUT If-None-Match: *): {what}. Two writers could both take one version number or move "
            "serial there, so Kit writes nothing to it. Use a store release that answers 412 to a create of an "
            "existing key (AWS S3 does; check MinIO's, Ceph RGW's, R2's or GCS's notes), or a folder registry.")

    def _listed(self, prefix: str, delimiter: bool = False) -> Listed:
        """With a static key: :func:`kit.registry.s3list.list_prefix` (URL-encoded keys; a key that is not a
        plain path is skipped, not fatal). Without one (obstore's credential chain): obstore's listing."""
        from kit.registry.s3list import Listed, list_prefix

        try:
            if self.rest is not None:
                return list_prefix(self.rest, prefix, delimiter)
            import obstore

            if delimiter:
                res = obstore.list_with_delimiter(self.store, prefix.rstrip("/") or None)
                return Listed({}, sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in res["common_prefixes"]))
            return Listed({str(m["path"]): int(m["size"]) for batch in obstore.list(self.store, prefix or None)
                           for m in batch}, [])
        except Exception as exc:  # a store that refused, or answered with no listing
            raise self._fail("list", prefix or "/", exc) from exc

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self._listed(prefix).keys)

    def sizes(self, prefix: str) -> dict[str, int]:
        """Each key under ``prefix`` -> its size in bytes, as the listing says (no object is read)."""
        return dict(self._listed(prefix).keys)

    def folders(self, prefix: str) -> list[str]:
        """The names of the "folders" right under ``prefix`` (a LIST with delimiter ``/``)."""
        return list(self._listed(prefix, delimiter=True).folders)

    def delete(self, key: str) -> None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            obstore.delete(self.store, check_key(key))
        except (NotFoundError, FileNotFoundError):
            pass
        except Exception as exc:
            raise self._fail("delete", key, exc) from exc

    def download(self, key: str, dst: Path, max_bytes: int, progress: Progress | None = None) -> tuple[str, int]:
        """Stream ``key`` into the new file ``dst`` (0600) while hashing it; (sha256, size). The file is
        fsync'd (flushed while it downloads, :class:`_Flusher`) unless this is a verified cache's fill
        (:func:`kit._io.unsynced`: it records the boot instead). ``FileNotFoundError`` when absent,
        ``ValueError`` past ``max_bytes`` (refused by its announced size before a byte is read, and again
        while reading), ``StorageError`` when ``dst``'s disk cannot hold it (checked against the announced
        size first, as every write of a known size is)."""
        import obstore
        from obstore.exceptions import NotFoundError

        h, size, durable = hashlib.sha256(), 0, syncing()
        try:
            res = obstore.get(self.store, check_key(key))
            total = int(res.meta["size"])
            if total > max_bytes:
                raise ValueError(f"{key} is {total} bytes, over {max_bytes}")
            what = f"{self.describe()}/{key} (a download)"
            ensure_free_space(dst.parent, total, what)  # a full disk refuses it whole, before a byte is written
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with storage_errors(dst.parent, what, total), os.fdopen(fd, "wb") as f:
                with _Flusher(f.fileno() if durable else None) as flusher:
                    for chunk in _prefetched(iter(res.stream(min_chunk_size=_CHUNK)), h.update):
                        size += len(chunk)
                        if size > max_bytes:
                            raise ValueError(f"{key} grew past {max_bytes} bytes")
                        f.write(chunk)
                        flusher.wrote(len(chunk))
                        if progress is not None:
                            progress(size, total)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except (NotFoundError, FileNotFoundError) as exc:
            raise FileNotFoundError(f"{self.describe()}/{key}") from exc
        except (ValueError, OSError, StorageError):
            raise
        except Exception as exc:
            raise self._fail("download", key, exc) from exc
        return h.hexdigest(), size

    def upload(self, key: str, src: Path, progress: Progress | None = None, *, sha256: str | None = None) -> None:
        """Send the local file ``src`` as ``key``. Over one part with its ``sha256`` given (what a register
        knows), a resumable upload (:mod:`kit.registry.s3parts`): a re-run sends only the parts not yet
        staged. Otherwise one PUT, or obstore's multipart upload (parts in parallel, not resumable).
        ``progress(bytes done, bytes total)`` as it goes."""
        import obstore

        src = Path(src)
        total = src.stat().st_size
        try:
            if total > self.part_size and sha256 is not None and self.rest is not None:
                from kit.registry.s3parts import StagedUpload, plan

                StagedUpload(self, plan(check_key(key), src, total, sha256, self.part_size), progress).run()
                return
            obstore.put(self.store, check_key(key), _chunks(src, total, self.part_size, progress),
                        chunk_size=self.part_size, max_concurrency=self.max_concurrency,
                        use_multipart=total > self.part_size)
            self.sent_bytes += total
        except StorageError:
            raise
        except Exception as exc:
            raise self._fail("upload", key, exc) from exc

    def send_part(self, key: str, data: bytes) -> None:
        """One PUT of a staged part (counted in :attr:`sent_bytes`)."""
        import obstore

        obstore.put(self.store, key, data, use_multipart=False)
        with self._sent_lock:
            self.sent_bytes += len(data)

    def upload_whole(self, key: str, src: Path) -> None:
        """obstore's one-call multipart upload of ``src`` (not resumable)."""
        import obstore

        total = src.stat().st_size
        obstore.put(self.store, key, _chunks(src, total, self.part_size, None), chunk_size=self.part_size,
                    max_concurrency=self.max_concurrency)
        with self._sent_lock:
            self.sent_bytes += total


class _Flusher:
    """Writes a download's bytes to disk while it downloads: every ``_FLUSH_EVERY`` bytes written, a thread
    calls ``fdatasync`` (one at a time), so the final ``fsync`` finds little left and a download costs about the
    slower of the wire and the disk rather than their sum. With no ``fd`` (a download left unsynced), nothing."""

    def __init__(self, fd: int | None) -> None:
        self.fd, self.pending = fd, 0
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Flusher:
        return self

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.fd is None or self.pending < _FLUSH_EVERY or (self.thread is not None and self.thread.is_alive()):
            return
        self.pending = 0
        self.thread = threading.Thread(target=self._sync, args=(self.fd,), daemon=True)
        self.thread.start()

    @staticmethod
    def _sync(fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError:  # the final fsync, on the writer's thread, reports a failing disk
            pass

    def __exit__(self, *exc: object) -> None:
        if self.thread is not None:
            self.thread.join()  # before the file (and its descriptor) is closed


def _prefetched(chunks: Iterator[T], each: Callable[[T], None], depth: int = 4) -> Iterator[T]:
    """``chunks``, read ahead by a thread that also calls ``each`` on every chunk (the hash), in order, before
    handing it over (``depth`` chunks at most held): the wire, the hash and the caller's write of the
    previous chunk proceed at once (each releases the GIL), so a download costs about its slowest step
    instead of their sum. A chunk is handed over only after ``each`` saw it: the digest names what is written."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for c in chunks:
                each(c)
                while not stop.is_set():
                    try:
                        q.put(("chunk", c), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(("error", exc))

    th = threading.Thread(target=pump, name="kit-s3-prefetch", daemon=True)
    th.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def _chunks(src: Path, total: int, size: int, progress: Progress | None) -> Iterator[bytes]:
    done = 0
    with open(src, "rb") as f:
        while chunk := f.read(size):
            done += len(chunk)
            yield chunk
            if progress is not None:
                progress(done, total)
