"""NAS sync (no Dagster): manifest-routed copies of a job's artifacts to mounted paths,
rsync, SFTP or S3, verified, atomic and idempotent. How it works: ``docs/nas_sync.md``;
the user's guide: the README's *NAS sync*."""

from .config import (Destination, NasConfig, NasConfigError, Route, load_config,
                     parse_config, parse_destination)
from .errors import DestinationUnavailable, SyncError
from .sync import (SYNC_FILE, ArtifactSync, SyncResult, needs_sync, pending_jobs,
                   read_sync_record, resolve_config, sync_all, sync_job)

__all__ = ["Destination", "NasConfig", "NasConfigError", "Route", "load_config",
           "parse_config", "parse_destination", "DestinationUnavailable", "SyncError",
           "SYNC_FILE", "ArtifactSync", "SyncResult", "needs_sync", "pending_jobs",
           "read_sync_record", "resolve_config", "sync_all", "sync_job"]
