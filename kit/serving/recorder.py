"""Traffic capture: a sample of a service's requests (inputs, served version, outputs) as JSONL, written
off the request path, for ``kit replay`` (:mod:`kit.replay`).

:meth:`Recorder.record` is called from the request-log path for every inference request
that was answered 200. It draws the sample and puts references to the request's tensors on a bounded
queue (``put_nowait``: a full queue drops the record and counts it, a request never waits); the worker's
writer thread turns them into JSON and appends them to ``<folder>/<model>-<host>-<pid>.jsonl``. A file
that reaches ``max_file_bytes`` is closed and renamed with a sequence number. ``max_bytes`` bounds the
folder's capture files of the model, every worker's and every predecessor's (a worker recycled by
``max_requests`` leaves its files behind): whenever a worker begins a file, the oldest files go until the
folder plus one more file fits (rotation). Captured requests are user data: files are 0600 in a 0700
folder, opened without following a link. ``drop_inputs`` names inputs that are never written (privacy):
their values are ``null`` in the record, and replay skips such records.

One record (one line)::

    {"schema": 1, "ts": 1764355200.123, "request_id": "...", "model": "digits", "version": 3,
     "latency_ms": 1.9, "inputs": {"x": {"dtype": "float32", "shape": [1, 64], "data": [[...]]}},
     "outputs": {"output_0": {"dtype": "float32", "shape": [1, 10], "data": [[...]]}}}
"""

from __future__ import annotations

import logging
import os
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from kit import service_settings as settings
from kit._types import Array, JSONObject
from kit.errors import ServiceError

if TYPE_CHECKING:
    import numpy as np

    from kit.signature import Signature

    # (time, request id, version, seconds, signature, inputs, outputs): one request on the writer's queue
    _Item = tuple[float, str, int, float, Signature, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]

log = logging.getLogger(__name__)

SCHEMA = 1
_CLOSED = re.compile(r"\.[0-9]{6}\.jsonl$")  # a rotated file: <model>-<host>-<pid>.<seq>.jsonl


def _d(key: str) -> Any:
    return settings.default("capture", key)


@dataclass(frozen=True)
class CaptureSettings:
    """``[capture]`` in service.toml (off unless ``enabled``)."""

    enabled: bool = _d("enabled")
    sample_rate: float = _d("sample_rate")  # share of answered inference requests recorded (1.0: all)
    folder: str = _d("folder")  # relative to the service folder, or absolute
    max_bytes: int = _d("max_bytes")  # over the folder's capture files of the model: all workers, past ones too
    max_file_bytes: int = _d("max_file_bytes")  # a file this large is closed and a new one begun
    drop_inputs: tuple[str, ...] = _d("drop_inputs")  # input names never written
    queue_size: int = _d("queue_size")  # records waiting for the writer; beyond it dropped (and counted)


def parse_capture_settings(table: Mapping[str, Any], where: str) -> CaptureSettings:
    """Check a ``[capture]`` table (``where`` names the file in errors): the declared types and ranges
    (:mod:`kit.service_settings`), then the sizes against each other."""
    values = settings.check_section("capture", table, where)
    s = CaptureSettings(**values)
    if not 0.0 <= s.sample_rate <= 1.0 or s.max_file_bytes < 1024 or s.max_bytes < s.max_file_bytes or s.queue_size < 1:
        raise ServiceError(f"{where}: [capture] needs 0 <= sample_rate <= 1, max_file_bytes >= 1024, "
                           f"max_bytes >= max_file_bytes and queue_size >= 1 (got {asdict(s)}).")
    return s


def tensor_doc(t: Array) -> JSONObject:
    """An array as JSON: dtype (numpy's name, which is torch's without ``torch.``), shape, nested lists.
    The serving path hands numpy arrays; a torch tensor is taken too."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.tolist()}
    return {"dtype": t.dtype.name, "shape": list(t.shape), "data": t.tolist()}


class Recorder:
    """One worker's capture: :meth:`record` on the request path, a writer thread behind it."""

    def __init__(self, settings: CaptureSettings, model: str, folder: Path):
        self.settings = settings
        self.model = model
        self.folder = folder
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self.dropped = 0  # records lost to a full queue
        self.written = 0
        self._drop = frozenset(settings.drop_inputs)
        self._queue: queue.Queue[_Item | None] = queue.Queue(settings.queue_size)
        self._rand = random.Random()
        self._file: IO[bytes] | None = None
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name=f"kit-capture-{model}", daemon=True)
        self._thread.start()

    # ---- the request path
    def record(self, rid: str, version: int | None, status: int, seconds: float, signature: Signature | None,
               inputs: Sequence[np.ndarray] | None, outputs: Sequence[np.ndarray] | None) -> None:
        """Maybe record one request (no I/O, no conversion here: references go on the queue)."""
        if status != 200 or inputs is None or outputs is None or version is None or signature is None:
            return
        if self.settings.sample_rate < 1.0 and self._rand.random() >= self.settings.sample_rate:
            return
        try:
            self._queue.put_nowait((time.time(), rid, version, seconds, signature, tuple(inputs), tuple(outputs)))
        except queue.Full:
            self.dropped += 1

    # ---- the writer thread
    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    self._close_file()
                    return
                self._write(item)
            except Exception:  # capture must never take the worker down
                log.exception("%s: capture write failed (%s)", self.model, self.folder)
            finally:
                self._queue.task_done()

    def _write(self, item: _Item) -> None:
        ts, rid, version, seconds, sig, inputs, outputs = item
        names, out_names = [spec.name for spec in sig.inputs], list(sig.output_names)
        if len(out_names) != len(outputs):
            out_names = [f"output_{i}" for i in range(len(outputs))]
        doc = {"schema": SCHEMA, "ts": round(ts, 3), "request_id": rid, "model": self.model, "version": version,
               "latency_ms": round(seconds * 1000, 3),
               "inputs": {n: (None if n in self._drop else tensor_doc(t)) for n, t in zip(names, inputs)},
               "outputs": {n: tensor_doc(t) for n, t in zip(out_names, outputs)}}
        line = orjson.dumps(doc) + b"\n"
        f = self._open()
        f.write(line)
        f.flush()  # a reader (kit replay) sees whole lines; no fsync: a lost tail is a lost sample
        self.written += 1
        if f.tell() >= self.settings.max_file_bytes:
            self._rotate()

    def _current(self) -> Path:
        return self.folder / f"{self.model}-{self.worker}.jsonl"

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.folder.stat().st_mode & 0o077:
                os.chmod(self.folder, 0o700)  # requests are user data: only the service's user reads them
            self._trim()  # a new file: make room for it over the whole folder (predecessors' files too)
            fd = os.open(self._current(), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)  # also when a file of an earlier kit (0644) is reopened
            self._file = os.fdopen(fd, "ab")
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _rotate(self) -> None:
        self._close_file()
        self._seq += 1
        os.replace(self._current(), self.folder / f"{self.model}-{self.worker}.{self._seq:06d}.jsonl")

    def _trim(self) -> None:
        """Remove the oldest capture files of the model in the folder until it holds at most ``max_bytes`` minus
        one file. Another worker's open file (written in the last minute) is left to it."""
        files = []
        for p in self.folder.glob(f"{self.model}-*.jsonl"):
            try:
                st = p.lstat()
            except OSError:
                continue
            files.append((st.st_mtime, p, st.st_size))
        total = sum(size for _, _, size in files)
        recent = time.time() - 60
        for mtime, p, size in sorted(files):
            if total + self.settings.max_file_bytes <= self.settings.max_bytes:
                break
            if mtime > recent and not _CLOSED.search(p.name):  # <model>-<worker>.jsonl: maybe a live worker's
                continue
            p.unlink(missing_ok=True)
            total -= size


def make_recorder(settings: CaptureSettings | None, model: str, service_dir: Path) -> Recorder | None:
    """The worker's recorder, or None when ``[capture]`` is off."""
    if settings is None or not settings.enabled:
        return None
    folder = Path(settings.folder).expanduser()
    folder = folder if folder.is_absolute() else service_dir / folder
    log.info("%s: capturing %.1f%% of answered requests to %s", model, settings.sample_rate * 100, folder)
    return Recorder(settings, model, folder)


__all__ = ["CaptureSettings", "Recorder", "make_recorder", "parse_capture_settings", "tensor_doc"]
