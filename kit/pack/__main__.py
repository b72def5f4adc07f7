"""``python -m kit.pack verify ROOT``: what run.sh runs on the server (see :mod:`kit.pack.runtime`).

A package ``__main__`` (not ``-m kit.pack.runtime``, which the package has already imported, so runpy
warned on every start).
"""

import sys

from kit.pack.runtime import main

sys.exit(main())
