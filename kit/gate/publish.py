"""How a gate run's evidence reaches the registry: once, at the end, from the gate's private folder.

:func:`publish` copies what the notebooks left in the private run folder into ``versions/<n>/gates/<run-id>/``
(hashing each file from the one read it copies), then writes ``result.json.sig`` and ``result.json`` from the
same bytes in memory; :class:`_RegistryFolder` reaches that folder without following links.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from kit.errors import GateError
from kit.gate.evidence import GATES_DIR, REPORT_FILE, RESULT_FILE, GateResult, result_bytes
from kit.signing import sig_path, signature_record

if TYPE_CHECKING:
    from kit.registry import Registry


def publish(registry: Registry, result: GateResult, work: Path, run_dir: Path) -> GateResult:
    """Copy the private run folder's evidence into ``run_dir`` in the registry, then the signature and
    ``result.json`` made from the same bytes in memory (result.json last: its presence means the run is
    whole). The result names every copied file's sha256, so its signature covers the evidence too."""
    files: dict[str, str] = {}
    with _RegistryFolder(Path(registry.root), run_dir) as out:
        for p in sorted(work.iterdir()):
            if p.is_file() and not p.is_symlink() and p.name != RESULT_FILE:
                data = p.read_bytes()  # what the gate made; copied and hashed from one read
                files[p.name] = hashlib.sha256(data).hexdigest()
                out.write(p.name, data)
        final = dataclasses.replace(
            result, run_dir=run_dir, report=run_dir / REPORT_FILE, registry_root=Path(registry.root), files=files,
            notebooks=tuple(dataclasses.replace(n, executed=run_dir / n.executed.name) for n in result.notebooks))
        data = result_bytes(final)
        ring = registry.keyring
        if ring is not None and ring.can_sign():  # a result nobody trusted signed is no gate
            sig = signature_record(data, ring.signer(), RESULT_FILE)
            out.write(sig_path(Path(RESULT_FILE)).name, (json.dumps(sig, indent=2, sort_keys=True) + "\n").encode())
        out.write(RESULT_FILE, data)
    return final


class _RegistryFolder:
    """A new run folder under the registry, reached without following links: each component below the
    registry root is opened with ``O_NOFOLLOW`` and files are written relative to the folder's descriptor
    (a fresh name, fsync, rename), so a writer who plants a symlink in the registry cannot send the gate's
    writes elsewhere; the run folder itself must not exist yet."""

    def __init__(self, root: Path, run_dir: Path):
        self.path = run_dir
        parts = run_dir.relative_to(root).parts
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if last or part == GATES_DIR:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        if last:
                            raise GateError(f"The gate's run folder {run_dir} already exists: something else wrote "
                                            "into the registry. Run the gate again.") from None
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            os.close(fd)
            raise GateError(f"Cannot write the gate's evidence to {run_dir}: {exc.strerror} at {part!r} (a link or a "
                            "file where the registry keeps a folder: someone else wrote into the registry). Restore "
                            "that folder and run the gate again.") from exc
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def write(self, name: str, data: bytes) -> None:
        tmp = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=self.fd),
                       "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def __enter__(self) -> _RegistryFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.fsync(self.fd)  # the renames are durable before the gate reports its verdict
        finally:
            os.close(self.fd)
