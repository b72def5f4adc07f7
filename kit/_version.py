"""Kit's version, from the installed distribution's metadata (pyproject.toml is the one place it is set).

Its own module, so the serving runtime and the packer can name the version without importing the package's
``__init__`` for it (the notebook extension's entry point lives there).
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("kit")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
