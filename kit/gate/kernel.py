"""The Jupyter kernel a gate runs in: this very interpreter, its output logged to the run folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from kit.errors import GateError

log = logging.getLogger(__name__)

PRIVATE_KERNEL = "kit-gate"  # a kernelspec made on the fly for sys.executable; nothing is installed
KIT_KERNEL = "kit"  # what `make env` installs with --sys-prefix; registered here when missing


def _kernel_manager_class(kernel_name: str, log_path: Path) -> type:
    """A kernel manager that runs ``sys.executable`` (for the private kernel) and logs to a file.

    The kernel's own stdout/stderr (ipykernel warnings, a segfault's last words) go to
    ``log_path`` in the run folder: evidence, and no noise on the caller's terminal.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    private = kernel_name == PRIVATE_KERNEL

    class GateKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> KernelSpec | None:
            if private:
                if self._kernel_spec is None:
                    self._kernel_spec = KernelSpec(
                        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                        display_name=f"Kit gate ({sys.prefix})", language="python", name=PRIVATE_KERNEL,
                        resource_dir="", metadata={})
                return self._kernel_spec
            return super().kernel_spec

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            with open(log_path, "ab") as fh:  # the child keeps its own copy of the descriptor
                kw.setdefault("stdout", fh)
                kw.setdefault("stderr", fh)
                await super()._async_launch_kernel(kernel_cmd, **kw)

    return GateKernelManager


def ensure_kernel(kernel_name: str | None) -> str:
    """The kernel to run: None -> a private spec for this interpreter; a named one must exist.

    ``"kit"`` (what ``make env`` installs) is registered into ``sys.prefix`` when missing.
    """
    if kernel_name is None or kernel_name == PRIVATE_KERNEL:
        return PRIVATE_KERNEL
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        ksm.get_kernel_spec(kernel_name)
        return kernel_name
    except NoSuchKernel:
        if kernel_name != KIT_KERNEL:
            have = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
            raise GateError(
                f"No Jupyter kernel named {kernel_name!r} (have: {have}). Leave kernel_name unset to run "
                f"in this interpreter ({sys.executable}), or install it with "
                f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}`."
            ) from None
    from ipykernel.kernelspec import install

    path = install(kernel_name=KIT_KERNEL, prefix=sys.prefix, display_name=f"Kit ({Path(sys.prefix).name})")
    log.info("registered the %r kernelspec at %s", KIT_KERNEL, path)
    return kernel_name

