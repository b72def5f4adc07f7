"""The model registry: immutable numbered versions, aliases, and an append-only audit log.

One module per seam; :class:`Registry` stacks the three layers of methods, each built on the one below:

- :mod:`kit.registry.names` — model names, version numbers, ``name@ref`` and canary weights (user input).
- :mod:`kit.registry.records` — ``ModelVersion``, ``Aliases``, ``VerifyResult``, ``artifact_digest``.
- :mod:`kit.registry.lineage` — ``detect_source``: the notebook or script and git commit of a register.
- :mod:`kit.registry.store` — ``Store``: the on-disk layout, lock, reading, ``register``, audit log.
- :mod:`kit.registry.storage`, :mod:`kit.registry.s3`, :mod:`kit.registry.remote` — where the bytes live:
  ``Registry("s3://bucket/prefix")`` is an :class:`ObjectRegistry` (conditional creates instead of locks).
- :mod:`kit.registry.integrity` — ``CheckedStore``: sha256 and signatures, ``load``, the gate rule.
- :mod:`kit.registry.aliases` — ``AliasMoves``: promote, canary, rollback, repair.
- :mod:`kit.registry.loaded` — ``LoadedModel``: a verified version ready for inference.

Import from here (``from kit.registry import Registry``); the modules are the layout, not the interface.
"""

from __future__ import annotations

from pathlib import Path

from kit.registry.aliases import AliasMoves
from kit.registry.lineage import detect_source
from kit.registry.loaded import LoadedModel
from kit.registry.names import (
    ALIASES,
    REFS,
    is_version_text,
    parse_ref,
    parse_weight,
    validate_name,
    validate_version,
)
from kit.registry.records import SCHEMA, Aliases, ModelVersion, VerifyResult, artifact_digest, utcnow
from kit.registry.remote import ObjectStoreMixin
from kit.registry.storage import is_url

__all__ = [
    "ALIASES",
    "REFS",
    "SCHEMA",
    "Aliases",
    "LoadedModel",
    "ObjectRegistry",
    "ModelVersion",
    "Registry",
    "VerifyResult",
    "artifact_digest",
    "detect_source",
    "is_version_text",
    "parse_ref",
    "parse_weight",
    "utcnow",
    "validate_name",
    "validate_version",
]


class Registry(AliasMoves):
    """A registry rooted at a folder (or ``s3://bucket/prefix``). Safe to use from many processes at once.

    ``Registry(root, require_gate=True, user=None, keyring="configured", cache_dir=None)``. Without a
    ``keyring`` it signs with the user's key and checks signatures against the user's trust, by the rule
    ``Registry.from_config`` uses (``KIT_KEYS_DIR``, else kit.toml's ``keys_dir``, else ``~/.config/kit/keys``;
    the key is made, with a warning naming its path, the first time something is signed). ``keyring=None``
    opens an unsigned registry (nothing signed, no signature checked): for tests of unsigned or legacy
    registries and tools that only list; ``deploy`` refuses to move an alias in one. A
    :class:`kit.signing.Keyring` of your own (``Keyring.verify_only(trust)`` for a reader that never signs)
    is used as given. See :class:`kit.registry.store.Store`.
    """

    def __new__(cls, root: Path | str | None = None, *args: object, **kwargs: object) -> Registry:
        if cls is Registry and is_url(root):  # s3://bucket/prefix: the object-store registry
            return super().__new__(ObjectRegistry)
        return super().__new__(cls)


class ObjectRegistry(ObjectStoreMixin, Registry):
    """A registry in an S3-compatible bucket (:mod:`kit.registry.remote`): ``Registry("s3://bucket/prefix")``."""
