"""Errors of NAS sync. Messages are for people and never hold a secret."""

from __future__ import annotations


class SyncError(RuntimeError):
    """One copy could not be done (permission denied, disk full, verification failed...)."""


class DestinationUnavailable(SyncError):
    """The destination cannot be reached (host down, share not mounted, bucket missing).
    Every artifact routed there fails with the same message; a retry may succeed."""
