"""``nas_copy``: the per-track NAS sync asset, downstream of ``manifest``.

It copies the track's artifacts to the routes of the NAS sync config (``imaker.nas``).
When sync is disabled or not configured it materializes as *skipped* (metadata
``status: skipped`` and a warning in the run log) so the track completes normally. A
destination that is down fails the step with the reason; the retry policy retries it with
exponential backoff, and a later success completes it. ``outputs/`` is never modified
apart from ``sync.json``.
"""


from dagster import (AssetExecutionContext, Backoff, Failure, Jitter, MaterializeResult,
                     MetadataValue, RetryPolicy)

from imaker.nas import NasConfigError, SyncError, resolve_config, sync_job
from imaker.pipeline import Library
from resources import SettingsResource

from .assets import each_track, manifest, track_asset
from .partitions import REMIX_BACKFILL

#: 4 tries over ~7 minutes: 60 s, 120 s, 240 s (±jitter) between them
NAS_RETRY_POLICY = RetryPolicy(max_retries=3, delay=60, backoff=Backoff.EXPONENTIAL,
                               jitter=Jitter.PLUS_MINUS)


def _table(result) -> str:
    rows = ["| artifact | status | destination | bytes sent |", "|---|---|---|---|"]
    for a in result.artifacts:
        dest = a.destination or "—"
        note = f" ({a.message})" if a.message else ""
        rows.append(f"| {a.path} | {a.status}{note} | {dest} | {a.bytes_sent} |")
    return "\n".join(rows)


def build_nas_copy(retry_policy: RetryPolicy | None = NAS_RETRY_POLICY, name: str = "nas_copy"):
    """The asset; tests build one with a short retry policy."""

    @track_asset(
        name=name, version_of="nas_copy", deps=[manifest], retry_policy=retry_policy,
        kinds={"nas"}, backfill_policy=REMIX_BACKFILL,
        description="Copies the track's artifacts to the NAS routes of the sync config "
                    "(local path, rsync, SFTP, S3), verified by size and sha256; "
                    "records outputs/<job_id>/sync.json. Skipped when NAS sync is off.")
    def _nas_copy(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        s = settings.get()
        lib = Library.from_settings(s)
        try:
            config, reason = resolve_config(s.nas.enabled, s.nas.config_path)
        except NasConfigError as exc:
            raise Failure(description=f"NAS sync config is invalid: {exc}",
                          allow_retries=False) from None

        def copy(job_id: str, _store) -> dict:
            if config is None:
                context.log.warning(f"{job_id}: NAS copy skipped: {reason}")
                return {"status": "skipped", "reason": reason}
            try:
                result = sync_job(lib.output_dir(job_id), config, log=context.log)
            except SyncError as exc:
                raise Failure(description=str(exc)) from None
            metadata = {
                "status": result.status,
                "copied": result.count("copied", "replaced", "kept-both"),
                "unchanged": result.count("unchanged"),
                "skipped": result.count("skipped"),
                "unrouted": result.count("unrouted"),
                "failed": result.count("failed"),
                "bytes_sent": result.bytes_sent,
                "sync_json": MetadataValue.path(str(result.sync_json)),
                "artifacts": MetadataValue.md(_table(result)),
                "destinations": MetadataValue.json([a.to_dict() for a in result.artifacts]),
            }
            if result.status == "failed":
                # outputs stay as they are; the retry policy tries again later (a run of
                # several tracks: the whole range, the copies already made are "unchanged")
                raise Failure(description=result.error_message(), metadata=metadata)
            return metadata

        # no drop archived on failure (the manifest step already archived it to done/)
        return each_track(context, settings, None, copy)

    return _nas_copy


nas_copy = build_nas_copy()
