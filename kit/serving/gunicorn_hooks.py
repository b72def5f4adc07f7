"""What a generated ``gunicorn.conf.py`` uses. Imported by gunicorn's master: importing this module
never imports torch, and nothing here ever touches CUDA.

Workers load models after fork (``preload_app = False``), so a model, a thread pool or a CUDA context
is only ever created in a worker. With ``[service] preload = true`` (the default) the master imports the
serving modules -- torch, numpy, uvicorn -- in ``on_starting``, before forking: importing torch starts no
threads and initialises no CUDA, and each worker then starts in a fraction of a second instead of
importing torch itself (seconds, times the number of workers, on a small machine).

With ``[model] backend = "onnxruntime"`` the master preloads onnxruntime, numpy and the serving modules
instead, and never torch: neither the master nor a worker of such a service imports it (tested by
reading every process's memory maps). The backend is the one :func:`prepare` read from service.toml, so a
``gunicorn.conf.py`` generated before backends existed works unchanged.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit._proc import refuse_taken_port
from kit.errors import ServiceError
from kit.serving.config import ServiceConfig, load_service_config, worker_plan

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

log = logging.getLogger(__name__)

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_CLASS = "kit.serving.worker.KitUvicornWorker"  # what gunicorn.conf.py names (uvicorn workers)
_BACKEND = "torch"  # set by prepare() from service.toml


def prepare(service_dir: Path | str, environ: MutableMapping[str, str]) -> tuple[ServiceConfig, dict[str, Any]]:
    """Resolve the service config and the gunicorn settings; sets ``PROMETHEUS_MULTIPROC_DIR`` in
    ``environ`` (a fresh temporary folder unless given) so every worker inherits it."""
    cfg = load_service_config(service_dir, environ)
    owned = not environ.get(METRICS_ENV)
    if owned:
        # The service's own folder, in memory where the host has /dev/shm: not on a disk that logs or
        # registers may fill (samples files are allocated before use either way: kit.serving.metrics).
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        environ[METRICS_ENV] = tempfile.mkdtemp(prefix=f"kit-{cfg.name}-metrics-", dir=shm)
    Path(environ[METRICS_ENV]).mkdir(parents=True, exist_ok=True)
    workers, torch_threads = worker_plan(cfg)
    global _BACKEND
    _BACKEND = cfg.backend  # what on_starting and post_fork (in this process and its forks) serve with
    from kit.serving import worker  # read deadlines of the uvicorn workers, inherited through fork

    worker.set_limits(worker.Limits(header_timeout=cfg.header_timeout, body_timeout=cfg.body_timeout))
    settings = {
        "bind": cfg.bind,
        "workers": workers,
        # gunicorn.conf.py files generated before the Flask engine was retired read these three
        "worker_class": WORKER_CLASS, "threads": 1, "engine": "asgi",
        "timeout": cfg.timeout,
        "graceful_timeout": cfg.graceful_timeout,
        "keepalive": cfg.keepalive,
        "max_requests": cfg.max_requests,
        "max_requests_jitter": cfg.max_requests_jitter,
        "preload_app": False,
        "accesslog": None,  # the app writes one JSON line per request itself
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": f"kit-{cfg.name}",
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        "torch_threads": torch_threads,
        "preload": cfg.preload,
        "backend": cfg.backend,
        "metrics_dir_owned": owned,  # made here, so removed when the master exits
    }
    return cfg, settings


def on_starting(server: Arbiter, metrics_dir: str, preload: bool = True, _engine: str = "asgi",
                backend: str | None = None) -> None:
    """Master start: refuse a bind address something else holds, naming it; clear samples left by a
    previous run in the metrics folder; preload imports. (``_engine``: what files generated before the
    Flask engine was retired pass; ignored.)"""
    for addr in getattr(server.cfg, "address", ()):
        if isinstance(addr, tuple):  # (host, port); a unix socket path is gunicorn's to report
            try:
                refuse_taken_port(str(addr[0]), int(addr[1]))
            except ServiceError as exc:
                server.log.error("kit: error: %s", exc)
                raise SystemExit(f"kit: error: {exc}") from None
    for f in glob.glob(os.path.join(metrics_dir, "*.db")):
        try:
            os.unlink(f)
        except OSError:
            pass
    if not preload:
        return
    from kit.backends import get as get_backend
    from kit.env import fingerprint

    # the backend row's own imports (torch and the graph builder; or onnxruntime and numpy, never torch):
    # imports only, no threads, no CUDA, no model
    get_backend(backend or _BACKEND).module().preload()
    import kit.registry  # noqa: F401
    import kit.serving.asgi  # noqa: F401  (orjson, prometheus_client in multiprocess mode)
    fingerprint()  # read once per process (0.1 s) and inherited by every worker: their first load is fast


MASTER_POLL = 0.2  # seconds between a worker's looks at whether its master is still alive
ORPHAN_GRACE = 1.0  # seconds an orphaned worker gets to finish in-flight requests before it exits hard


def watch_master(master_pid: int, poll: float = MASTER_POLL, grace: float = ORPHAN_GRACE) -> threading.Thread:
    """In a worker: a daemon thread that ends this worker within about a second of its master's death.

    A SIGKILLed master cannot stop its workers, and gunicorn's uvicorn worker never looks at its parent:
    the orphans kept serving and held the port, so the service could not start again. When the parent is
    no longer ``master_pid`` the worker is sent SIGTERM (its graceful stop: in-flight requests finish) and,
    if it still runs ``grace`` seconds later, exits. Independent of the worker class.
    """
    def run() -> None:
        while os.getppid() == master_pid:
            time.sleep(poll)
        log.error("worker %d: its master %d is gone; stopping (in-flight requests get %.1f s)",
                  os.getpid(), master_pid, grace)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        log.error("worker %d: still running %.1f s after its master died; exiting", os.getpid(), grace)
        os._exit(1)

    t = threading.Thread(target=run, name="kit-master-watch", daemon=True)
    t.start()
    return t


def post_fork(server: Arbiter, worker: Worker, torch_threads: int, backend: str | None = None) -> None:
    """In the worker, before the app loads: exit with the master (:func:`watch_master`); cap torch's threads
    so workers x threads <= cores. On the onnxruntime backend torch is not imported; the session gets the
    same count (kit.serving.asgi)."""
    watch_master(server.pid)
    os.environ["OMP_NUM_THREADS"] = str(torch_threads)  # for libraries that read it at import
    if (backend or _BACKEND) == "onnxruntime":
        server.log.info("worker %s: onnxruntime intra-op threads %d", worker.pid, torch_threads)
        return
    import torch

    torch.set_num_threads(torch_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (torch allows it once per process)
        pass
    server.log.info("worker %s: torch threads %d", worker.pid, torch_threads)


def on_exit(server: Arbiter, metrics_dir: str, owned: bool) -> None:
    """Master exit: remove the metrics folder it made (a folder given by the operator is kept)."""
    if owned:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def child_exit(server: Arbiter, worker: Worker) -> None:
    """Master: a worker exited; drop its live gauges from the multiprocess metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
