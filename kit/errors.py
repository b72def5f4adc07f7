"""One error hierarchy for Kit.

Every message says what happened, names the value, and gives the next step.
Errors also inherit the matching builtin so callers can catch either.

    KitError
    ├── ConfigError (ValueError)                 bad kit.toml / KIT_* / argument
    ├── InvalidNameError (ValueError)            model name, version or alias refused
    ├── NotFoundError (LookupError)
    │   ├── ModelNotFoundError
    │   └── VersionNotFoundError
    ├── RegistryCorruptError                     unreadable aliases.json / meta.json
    ├── StorageError                             a folder full, read-only or failing: nothing half-written
    ├── IntegrityError                           sha256 mismatch, missing file
    │   └── SignatureError                       unsigned, untrusted key, or signature does not match
    ├── SigningKeyError (ConfigError)            no signing key / unreadable key or public key
    ├── UnsafeArtifactError                      refused to unpickle / unknown artifact format
    ├── CaptureError                             torch.export failed
    │   └── ParityError                          exported != eager beyond tolerance
    ├── EnvDriftError                            incompatible environment fingerprint
    ├── PromotionRefusedError                    no passing gate for this exact artifact
    ├── GateError                                the gate could not run (not a verdict)
    ├── ServiceError                             service generation / configuration
    ├── ServingError                             runtime model slot / reload failures
    └── PackError                                packing or verifying an archive
"""

from __future__ import annotations


class KitError(Exception):
    """Base class of every error Kit raises on purpose.

    The message describes the next step as an action ("validate it first", "force it with a reason"),
    never as one shell's flag. ``remedy`` names that action for the shells, which add their own hint when
    they show the error (``kit.cli._common``, ``kit.magics``, ``kit.widgets``); ``subject`` is what it is
    about (a ``name@version`` or a model name). Remedies: "validate", "force", "why", "promote",
    "start_canary", "no_check_model", "refresh".
    """

    def __init__(self, *args: object, remedy: str | None = None, subject: str | None = None):
        super().__init__(*args)
        self.remedy = remedy
        self.subject = subject


class ConfigError(KitError, ValueError):
    pass


class InvalidNameError(KitError, ValueError):
    pass


class NotFoundError(KitError, LookupError):
    pass


class ModelNotFoundError(NotFoundError):
    pass


class VersionNotFoundError(NotFoundError):
    pass


class RegistryCorruptError(KitError):
    pass


class StorageError(KitError):
    """A write refused by the storage (no space, quota, read-only, I/O error), before or while writing.
    ``folder`` is where, ``need`` the bytes the write needed (None when unknown)."""

    def __init__(self, message: str, *, folder: str | None = None, need: int | None = None):
        super().__init__(message)
        self.folder = folder
        self.need = need


class IntegrityError(KitError):
    pass


class SignatureError(IntegrityError):
    """A file is unsigned, signed by a key not trusted here, or changed after signing. ``key_id``: the signer."""

    def __init__(self, message: str, *, key_id: str | None = None):
        super().__init__(message)
        self.key_id = key_id


class SigningKeyError(ConfigError):
    pass


class UnsafeArtifactError(KitError):
    pass


class CaptureError(KitError):
    pass


class ParityError(CaptureError):
    def __init__(self, message: str, *, max_abs_diff: float, atol: float, rtol: float, batch_size: int):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        self.rtol = rtol
        self.batch_size = batch_size


class EnvDriftError(KitError):
    pass


class PromotionRefusedError(KitError):
    pass


class GateError(KitError):
    pass


class ServiceError(KitError):
    pass


class ServingError(KitError):
    pass


class PackError(KitError):
    pass


class DeployError(KitError):
    """``%deploy`` stopped at a step. Carries the step, the report to read (if any) and the partial result."""

    def __init__(self, message: str, *, step: str, report: object = None, result: object = None):
        super().__init__(message)
        self.step = step
        self.report = report
        self.result = result
