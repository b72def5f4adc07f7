"""Ship a generated service, its exact environment and its models as one archive.

    pack(service_dir)            -> PackResult   dist/<service>-<label>-<platform>.tar.gz
    verify_archive(archive)      -> VerifyReport unpack elsewhere, run.sh on a free port, /readyz, example

The environment goes in whole: with conda-pack when it is a conda environment (relocated on the server by
``conda-unpack``), else as a clearly labelled venv fallback that needs the same interpreter at the same
path on the server (``run.sh`` checks it first). kit itself goes in as a built wheel. See ``docs/pack.md``.
This package never imports kit.serving; :mod:`kit.pack.runtime` is what ``run.sh`` runs on the server.
"""

from kit.pack.build import PackResult, build_kit_wheel, pack, read_service
from kit.pack.envscan import EnvScan, Problem, scan
from kit.pack.verify import VerifyReport, verify_archive

__all__ = [
    "EnvScan",
    "PackResult",
    "Problem",
    "VerifyReport",
    "build_kit_wheel",
    "pack",
    "read_service",
    "scan",
    "verify_archive",
]
