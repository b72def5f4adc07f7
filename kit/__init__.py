"""Kit: take a PyTorch model from the notebook to a served, validated, canaried HTTP service.

``%load_ext kit`` registers the IPython magics (see :mod:`kit.magics`).
"""

from kit._version import __version__

__all__ = ["__version__", "load_ipython_extension"]


def load_ipython_extension(ipython: object) -> None:
    from kit.magics import load_ipython_extension as _load

    _load(ipython)
