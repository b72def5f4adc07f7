"""Resumable uploads of big files to an S3 bucket: parts staged as objects of their own, joined server-side.

obstore 0.12's Python API has no multipart primitives: ``put(use_multipart=True)`` and ``open_writer`` keep
the upload id inside one call and abort it on failure, and there is no create / upload-part / list-parts /
complete, nor UploadPartCopy. So a killed upload could only start over. Kit stages instead:

1. **Parts are ordinary objects**, content-addressed: part ``i`` of a file with sha256 ``H`` cut at
   ``P`` bytes is ``_uploads/H/P/<i>`` under the registry's prefix (``_`` is never a model name's first
   character), each one PUT by obstore (8 at a time). A PUT is atomic: a part
   is there whole or not at all. A re-run of the same upload (a register killed mid-upload, run again:
   the same file, the same sha256, whatever version number it claims now) lists that folder once and sends
   only the parts that are missing (a part found is kept when its size is right and, where the store's ETag
   is the part's MD5 as AWS, MinIO, Ceph, R2 and SeaweedFS give it, its MD5 matches the local bytes).
2. **The join is server-side**: a multipart upload to the final key whose parts are ``UploadPartCopy`` of
   the staged objects (no byte crosses the wire again), each copied as soon as it is staged (the server's
   copies overlap the client's sending), then ``CompleteMultipartUpload``: the final object
   appears whole, at once; readers (services, the cache, ``kit pack``) see one object per file and verify
   its sha256 as before. A staged part deleted meanwhile (another writer of the same bytes finishing first)
   is sent again and copied. Its size is checked by a HEAD after the join.
3. **Cleanup**: the staged parts are deleted once the object is whole; each resumable upload also deletes
   staged folders untouched for :data:`STALE_STAGING` (abandoned uploads of other files). Both are best
   effort (a store that denies ``s3:DeleteObject`` on ``_uploads/`` keeps them: a lifecycle rule expiring
   that one prefix removes them then). A join killed between its create and complete leaves an incomplete
   multipart upload, which S3 lists only to ``ListMultipartUploads``: a join that fails aborts its own; for
   killed ones, a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` (docs/fleet.md) removes them, as
   it does obstore's.

The four control requests (create, copy a part, complete, abort) are tiny signed REST calls made here with
the standard library (SigV4, :class:`S3Rest`): boto3 would add 34 MB and 160 ms of import for them, and the
bytes themselves go through obstore. They need static credentials (``AWS_ACCESS_KEY_ID``... or the shared
files, as :func:`kit.registry.s3.aws_settings` finds them); with credentials only from obstore's own chain
(instance metadata, web identity) an upload is obstore's one-call multipart upload, not resumable. A store
that refuses UploadPartCopy (501) gets the whole file in one obstore upload after its parts were staged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import logging
import math
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from obstore import ObjectMeta

log = logging.getLogger(__name__)

MAX_PARTS = 10_000  # S3's limit on a multipart upload's parts: a bigger file gets bigger parts
STAGING = "_uploads"  # the registry's one staging prefix (no model name starts with "_")
STALE_STAGING = timedelta(days=7)
_CONNECT_TIMEOUT_S = 2.0
_MD5 = re.compile(r'"?([0-9a-f]{32})"?')


class S3RequestError(Exception):
    """A control request the store refused: its HTTP status and S3 error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}".strip())
        self.status, self.code = status, code


class S3Rest:
    """The few S3 REST calls obstore does not expose, signed with AWS Signature Version 4 (path-style URLs,
    as :class:`kit.registry.s3.S3Storage` uses). ``settings``: :func:`kit.registry.s3.aws_settings`'s keys."""

    def __init__(self, bucket: str, prefix: str, settings: Mapping[str, str], timeout_s: float = 60.0):
        self.bucket, self.prefix, self.timeout_s = bucket, prefix, timeout_s
        self.key_id, self.secret = settings["access_key_id"], settings["secret_access_key"]
        self.token = settings.get("session_token")
        self.region = settings.get("region") or "us-east-1"
        endpoint = settings.get("endpoint") or f"https://s3.{self.region}.amazonaws.com"
        url = urllib.parse.urlsplit(endpoint)
        self.https, self.host = url.scheme == "https", url.netloc
        self.base = url.path.rstrip("/")

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str | None) -> str:
        """The URL path of ``key`` under the prefix; of the bucket itself for None (a listing)."""
        tail = "" if key is None else f"/{self.full_key(key)}"
        return urllib.parse.quote(f"{self.base}/{self.bucket}{tail}", safe="/-_.~")

    def request(self, method: str, key: str | None, query: Mapping[str, str], body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """One signed request; (status, body). Connection failures raise ``OSError``."""
        now = dt.datetime.now(dt.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest()
        hdrs = {"host": self.host, "x-amz-date": amz_date, "x-amz-content-sha256": payload,
                **{k.lower(): v for k, v in (headers or {}).items()}}
        if self.token:
            hdrs["x-amz-security-token"] = self.token
        path = self._path(key)
        qs = "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted(query.items()))
        names = sorted(hdrs)
        canonical = "\n".join([method, path, qs, "".join(f"{n}:{hdrs[n].strip()}\n" for n in names),
                               ";".join(names), payload])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        hdrs["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, "
                                 f"SignedHeaders={';'.join(names)}, Signature={signature}")
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(self.host, timeout=_CONNECT_TIMEOUT_S, context=ssl.create_default_context())
            if self.https else http.client.HTTPConnection(self.host, timeout=_CONNECT_TIMEOUT_S))
        try:
            conn.connect()  # an unreachable store fails fast, as obstore's connect timeout makes it
            conn.sock.settimeout(self.timeout_s)
            conn.request(method, path + (f"?{qs}" if qs else ""), body=body or None, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def call(self, method: str, key: str | None, query: Mapping[str, str], body: bytes = b"",
             headers: Mapping[str, str] | None = None) -> bytes:
        """:meth:`request`, its body when it succeeded; ``S3RequestError`` otherwise (also for the error
        document S3 may send with a 200 to a complete). An idempotent request (a listing, a part's copy, an
        abort) is tried once more after a dropped connection or a 500/503."""
        tries = 2 if method in ("GET", "PUT", "DELETE") else 1
        for attempt in range(tries):
            try:
                status, data = self.request(method, key, query, body, headers)
            except OSError:
                if attempt + 1 == tries:
                    raise
                continue
            if status not in (500, 503) or attempt + 1 == tries:
                break
        if status >= 300 or b"<Error>" in data[:512]:
            raise S3RequestError(status, xml_text(data, "Code") or "?", xml_text(data, "Message") or data[:200].decode(
                "utf-8", "replace"))
        return data

    def create(self, key: str) -> str:
        upload_id = xml_text(self.call("POST", key, {"uploads": ""}), "UploadId")
        if not upload_id:
            raise S3RequestError(200, "NoUploadId", f"CreateMultipartUpload of {key} gave no UploadId")
        return upload_id

    def copy_part(self, key: str, upload_id: str, number: int, source_key: str) -> str:
        """Part ``number`` of the upload: the whole object ``source_key`` of this bucket (server-side)."""
        source = urllib.parse.quote(f"{self.bucket}/{self.full_key(source_key)}", safe="/-_.~")
        data = self.call("PUT", key, {"partNumber": str(number), "uploadId": upload_id},
                         headers={"x-amz-copy-source": source})
        etag = xml_text(data, "ETag")
        if not etag:
            raise S3RequestError(200, "NoETag", f"UploadPartCopy of {source_key} gave no ETag")
        return etag

    def complete(self, key: str, upload_id: str, etags: list[str]) -> None:
        body = "<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml(e)}</ETag></Part>" for n, e in enumerate(etags, 1)
        ) + "</CompleteMultipartUpload>"
        self.call("POST", key, {"uploadId": upload_id}, body.encode())

    def abort(self, key: str, upload_id: str) -> None:
        self.call("DELETE", key, {"uploadId": upload_id})


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def xml_text(data: bytes, name: str) -> str | None:
    m = re.search(rb"<" + name.encode() + rb">([^<]*)</" + name.encode() + rb">", data)
    if m is None:
        return None
    return m.group(1).decode("utf-8", "replace").replace("&quot;", '"').replace("&amp;", "&")


@dataclass(frozen=True)
class Plan:
    """How one file is cut: ``count`` parts of ``size`` bytes (the last one shorter), staged under ``staging``."""

    key: str
    src: Path
    total: int
    size: int
    staging: str

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.total / self.size))

    def part_key(self, i: int) -> str:
        return f"{self.staging}/{i:05d}"

    def part_len(self, i: int) -> int:
        return min(self.size, self.total - i * self.size)


def plan(key: str, src: Path, total: int, sha256: str, part_size: int) -> Plan:
    """The parts of ``src`` (sent as ``key``): at least ``part_size`` bytes each, at most :data:`MAX_PARTS`."""
    need = math.ceil(total / MAX_PARTS)
    size = part_size if need <= part_size else math.ceil(need / (1 << 20)) << 20
    return Plan(key, src, total, size, f"{STAGING}/{sha256}/{size}")


def read_part(p: Plan, i: int) -> bytes:
    with open(p.src, "rb") as f:
        data = os.pread(f.fileno(), p.part_len(i), i * p.size)
    if len(data) != p.part_len(i):
        raise OSError(f"{p.src} changed while it was uploaded (part {i} is short)")
    return data


def stored_parts(p: Plan, listed: Mapping[str, ObjectMeta]) -> set[int]:
    """The parts of ``p`` already staged: ``listed`` maps each staged key to its listing (size, e_tag)."""
    have = set()
    for i in range(p.count):
        meta = listed.get(p.part_key(i))
        if meta is None or int(meta.get("size", -1)) != p.part_len(i):
            continue
        m = _MD5.fullmatch(str(meta.get("e_tag") or ""))
        if m is not None and hashlib.md5(read_part(p, i), usedforsecurity=False).hexdigest() != m.group(1):
            continue  # the right size, other bytes: sent again
        have.add(i)
    return have


def run_parts(send: Callable[[int], int], todo: list[int], workers: int,
              done: Callable[[int, int], None]) -> None:
    """``send(i)`` for every part in ``todo``, ``workers`` at a time; ``done(i, what send returned)`` as each
    finishes, on this thread. The first failure (or one ``done`` raises) is raised once the parts running
    have ended; the parts not started are not."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kit-s3-part") as pool:
        pending: dict[Future[int], int] = {}

        def settle() -> None:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                done(pending.pop(f), f.result())

        for i in todo:
            pending[pool.submit(send, i)] = i
            if len(pending) >= workers:
                settle()
        while pending:
            settle()


class StagedUpload:
    """One resumable upload of ``p.src`` to ``p.key`` through ``storage`` (a :class:`kit.registry.s3.S3Storage`
    with static credentials): the missing parts staged, each joined as soon as it is staged (the server's
    copies overlap the wire), completed, checked by size, staging deleted (module docstring)."""

    def __init__(self, storage: Any, p: Plan, progress: Callable[[int, int], None] | None):
        self.st, self.p, self.progress = storage, p, progress
        self.rest: S3Rest = storage.rest
        self.etags = [""] * p.count
        self.done = 0

    def run(self) -> None:
        import obstore

        p = self.p
        listed = {str(m["path"]): m for batch in obstore.list(self.st.store, p.staging + "/") for m in batch}
        have = stored_parts(p, listed)
        if have:
            log.info("resuming the upload of %s/%s: %d of %d parts already staged", self.st.describe(), p.key,
                     len(have), p.count)
        self._report(sum(p.part_len(i) for i in have))
        upload_id = self.rest.create(p.key)
        try:
            self._stage_and_copy(upload_id, have)
            self.rest.complete(p.key, upload_id, self.etags)
        except BaseException as exc:
            try:
                self.rest.abort(p.key, upload_id)
            except Exception:  # the lifecycle rule for incomplete multipart uploads removes it
                log.warning("could not abort the multipart upload of %s/%s", self.st.describe(), p.key)
            if not (isinstance(exc, S3RequestError) and exc.status == 501):
                raise
            log.warning("%s does not copy parts server-side (UploadPartCopy): %s is sent whole",
                        self.st.describe(), p.key)
            self.st.upload_whole(p.key, p.src)
        self._check_and_clean()

    def _report(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.p.total)

    def _send(self, i: int) -> int:
        data = read_part(self.p, i)
        self.st.send_part(self.p.part_key(i), data)
        return len(data)

    def _copy(self, upload_id: str, i: int) -> None:
        """Part ``i + 1`` of the upload: the staged part, copied on the server; staged again when gone (another
        writer of the same file finished and cleaned up meanwhile). Any 404 counts: AWS says ``NoSuchKey``, moto
        a bare 404 with no error document; a 404 for the upload itself (``NoSuchUpload``) fails the copy again."""
        p = self.p
        try:
            self.etags[i] = self.rest.copy_part(p.key, upload_id, i + 1, p.part_key(i))
        except S3RequestError as exc:
            if exc.status != 404:
                raise
            self._send(i)
            self.etags[i] = self.rest.copy_part(p.key, upload_id, i + 1, p.part_key(i))

    def _stage_and_copy(self, upload_id: str, have: set[int]) -> None:
        workers = self.st.max_concurrency
        failed: list[BaseException] = []  # the first copy that failed stops the staging

        def note(f: Future[None]) -> None:
            if not f.cancelled() and (exc := f.exception()) is not None:
                failed.append(exc)

        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kit-s3-copy") as copier:
            copies: list[Future[None]] = []

            def copy(i: int) -> None:
                copies.append(copier.submit(self._copy, upload_id, i))
                copies[-1].add_done_callback(note)

            def staged(i: int, n: int) -> None:
                self._report(n)
                if failed:
                    raise failed[0]
                copy(i)

            for i in sorted(have):
                copy(i)

            try:
                run_parts(self._send, [i for i in range(self.p.count) if i not in have], workers, staged)
            except BaseException:
                for f in copies:
                    f.cancel()
                raise
            for f in copies:
                f.result()

    def _check_and_clean(self) -> None:
        import obstore

        from kit.errors import StorageError

        p, st = self.p, self.st
        size = int(obstore.head(st.store, p.key)["size"])
        if size != p.total:
            raise StorageError(f"The registry {st.describe()} holds {p.key} as {size} bytes after its upload, "
                               f"not {p.total}: the store joined its parts wrongly. Retry the upload.",
                               folder=st.describe())
        try:
            obstore.delete(st.store, [p.part_key(i) for i in range(p.count)])
            self._sweep()
        except Exception as exc:  # the object is whole: staging left behind is the lifecycle rule's
            log.warning("%s: could not delete the staged parts under %s/ (%s); allow s3:DeleteObject on that "
                        "prefix or add the lifecycle rule in docs/fleet.md", st.describe(), p.staging,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    def _sweep(self) -> None:
        """Delete the staged parts of uploads nobody touched for ``storage.stale_staging`` (abandoned ones)."""
        import obstore

        folders: dict[str, list[ObjectMeta]] = {}
        for batch in obstore.list(self.st.store, f"{STAGING}/"):
            for m in batch:
                folders.setdefault(str(m["path"]).rsplit("/", 1)[0], []).append(m)
        cutoff = dt.datetime.now(dt.UTC) - self.st.stale_staging
        for metas in folders.values():
            if max(m["last_modified"] for m in metas) < cutoff:
                obstore.delete(self.st.store, [str(m["path"]) for m in metas])
