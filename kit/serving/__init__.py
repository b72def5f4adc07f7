"""The serving runtime that generated services import.

A generated ``app.py`` (``wsgi.py`` in folders of older Kits) calls :func:`make_app` (the ASGI app,
:mod:`kit.serving.asgi`) with a :class:`ServiceConfig` read by :func:`load_service_config`; its
``gunicorn.conf.py`` uses :mod:`kit.serving.gunicorn_hooks` and the worker class
:class:`kit.serving.worker.KitUvicornWorker`.

Modules: ``config`` (service.toml), ``slots`` (model slots + hot-reload watcher), ``router``
(override / sticky / weighted), ``engine`` (the inference thread and its batching), ``protocol`` (request parsing, the
Open Inference Protocol v2 and its binary extension), ``metrics`` (Prometheus, multiprocess-safe),
``security`` (API keys, rate limits), ``logs`` (JSON lines), ``openapi``, ``asgi`` (the app),
``handlers`` and ``control`` (its routes), ``http`` (error types to statuses, the response type), ``worker`` (the
gunicorn worker class), ``testing`` (a test client).

Importing this package is cheap and never imports torch: gunicorn's master imports
``kit.serving.gunicorn_hooks`` and must not touch torch or CUDA; workers load models after fork.
It never imports IPython, ipywidgets, papermill or nbconvert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kit.serving.config import ServiceConfig, load_service_config, worker_plan

if TYPE_CHECKING:
    from kit.serving.asgi import KitAsgiApp

__all__ = ["ServiceConfig", "load_service_config", "make_app", "worker_plan"]


def make_app(config: ServiceConfig, **kwargs: Any) -> KitAsgiApp:
    """The service's ASGI app (:func:`kit.serving.asgi.create_asgi_app`); what a generated app.py calls.
    Imported here, not at the top: the app pulls in the backend (torch), the master must not."""
    from kit.serving.asgi import create_asgi_app

    return create_asgi_app(config, **kwargs)
