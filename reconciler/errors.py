"""Errors of the kernel-facing layer. A kernel refusal is temporary unless proven otherwise:
the caller retries (the daemon with backoff) after re-reading live state."""

from __future__ import annotations


class KernelError(Exception):
    """The kernel (netlink, nftables or /proc/sys) refused or failed an operation."""

    def __init__(self, what: str, detail: str):
        self.what = what
        self.detail = detail
        super().__init__(f"{what}: {detail}")


class PreflightError(Exception):
    """Preflight found errors: apply does not start."""
