"""Per-track assets: source_audio -> stems -> variants -> manifest.

Each asset is a thin call into ``imaker.pipeline``; the files live in the library, the
stems store and outputs/, and the assets report metadata about them. A failure in any
stage archives the job to ``failed/`` with the stage and reason.

The re-mix chain (`variants`, `manifest`, `nas_copy`) also runs over many tracks at once:
a backfill puts up to ``TRACKS_PER_BACKFILL_RUN`` partitions in one run (Dagster's
``BackfillPolicy``; a partition-key range), and each of those steps loops over the run's
tracks (``each_track``). The queue sensor's runs are one partition: the same loop, once.
"""


from contextlib import contextmanager
from typing import Callable

import warnings

from dagster import (AssetExecutionContext, BetaWarning, Config, DataVersion, Failure,
                     MaterializeResult, MetadataValue, RetryRequested, asset,
                     observable_source_asset)

from imaker import analysis, media, pipeline, stemset
from imaker.queues import QueueStore
from imaker.separator.client import SeparatorClient
from resources import SettingsResource

from .partitions import REMIX_BACKFILL, tracks
from .versions import CODE_VERSIONS as _VERSIONS

GROUP = "tracks"
#: run tag naming the drop (the claim in working/) a run processes; runs started from the
#: UI or by a backfill have none and read the archived bundle
DROP_TAG = "imaker/drop_id"
#: attempts of the `stems` step when the separation service is unreachable or dies
SERVICE_RETRIES = 3
SERVICE_RETRY_WAIT_S = 10
#: metadata key of a failed run of several tracks: {job_id: reason} of each failed track
FAILED_TRACKS = "failed_tracks"


class VariantsConfig(Config):
    """Run config of `variants` and `stems` (launchpad: ``ops: variants: config:``)."""

    add_variants: list[str] = []  # variants to make besides the settings' and the bundle's
                                  # (`imaker backfill --variants`)


def track_asset(*, version_of: str | None = None, **kwargs):
    """``@asset`` of one track: a partition of `tracks` in the group `tracks`, with the code
    version ``versions.py`` declares for it (by its name, or ``version_of``)."""
    def decorate(fn):
        name = kwargs.get("name") or fn.__name__
        with warnings.catch_warnings():  # `backfill_policy` is "beta" in Dagster 1.13
            warnings.simplefilter("ignore", BetaWarning)
            return asset(**{**kwargs, "name": name}, partitions_def=tracks, group_name=GROUP,
                         code_version=_VERSIONS[version_of or name])(fn)
    return decorate


def drop_id(context: AssetExecutionContext) -> str | None:
    return context.run.tags.get(DROP_TAG)


@contextmanager
def _stage(context: AssetExecutionContext, settings: SettingsResource, stage: str,
           job_id: str | None = None):
    """Archive this run's drop to failed/ (with the stage and reason) if the stage raises."""
    store = QueueStore.from_settings(settings.get())
    with pipeline.failing_to_archive(store, job_id or context.partition_key, drop_id(context),
                                     stage):
        yield store


def each_track(context: AssetExecutionContext, settings: SettingsResource, stage: str | None,
               work: Callable[[str, QueueStore], dict]) -> MaterializeResult:
    """``work(job_id, store)`` for every track of the run, its metadata recorded on that
    track's partition (``add_asset_metadata(partition_key=...)``: one materialization per
    partition, each with its own metadata, also in a run of a partition range).

    A run of one track (every queue sensor run): an exception propagates as raised, after
    ``stage`` archived the drop to failed/ — the run's failure reason is that exception.

    A run of several tracks (a backfill): Dagster 1.13 records a step's output for every
    partition of its range or for none; a step cannot succeed for some partitions and fail
    for others (dagster-io/dagster#17836, #21072). So a failed track does not stop the loop:
    every other track of the range is still done (its files written), then the step fails
    with a ``Failure`` naming each failed track and its reason (description, shown on the
    run's step in the UI, and metadata ``failed_tracks`` = {job_id: reason}, read by
    ``lifecycle.track_failures`` for `imaker backfill`'s lines). Dagster then marks the
    range's partitions of this asset failed and does not run the steps below for it."""
    keys = context.partition_keys
    failed: dict[str, str] = {}
    for job_id in keys:
        try:
            if stage is None:
                meta = work(job_id, QueueStore.from_settings(settings.get()))
            else:
                with _stage(context, settings, stage, job_id) as store:
                    meta = work(job_id, store)
        except Exception as exc:
            if len(keys) == 1:
                raise
            failed[job_id] = getattr(exc, "description", None) or pipeline.describe_error(exc)
            context.log.error(f"{job_id}: {failed[job_id]}")
            continue
        context.add_asset_metadata(meta, partition_key=job_id)
    if failed:
        raise Failure(
            description=f"{len(failed)} of {len(keys)} tracks failed: "
                        + "; ".join(f"{job_id}: {reason}" for job_id, reason in failed.items()),
            metadata={FAILED_TRACKS: MetadataValue.json(failed)})
    return MaterializeResult()


@track_asset(
    kinds={"ffmpeg", "audio"},
    description="The bundle's audio, validated and decoded to 44.1 kHz stereo FLAC in the "
                "track library. Claims the bundle from its queue. Its data version is the "
                "sha256 of the input file, so a changed source marks the track stale.")
def source_audio(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
    job_id = context.partition_key
    s = settings.get()
    lib = pipeline.Library.from_settings(s)
    meta = pipeline.prepare_source(QueueStore.from_settings(s), lib, job_id, drop_id(context),
                                   tolerance=(s.retrievers.ytdl_duration_tol_sec,
                                              s.retrievers.ytdl_duration_tol_pct))
    bundle = meta["original_bundle"]
    return MaterializeResult(
        metadata={
            "artist": bundle["artist"], "title": bundle["title"],
            "album": bundle.get("album") or "",
            "duration_s": meta["duration_s"], "sample_rate": meta["sample_rate"],
            "channels": meta["channels"], "input_sha256": meta["input_sha256"],
            "input_codec": meta["input_codec"] or "unknown", "source_type": meta["source_type"],
            "input_peak_dbfs": meta["input_peak_dbfs"] if meta["input_peak_dbfs"] is not None
            else "silent",
            "source_url": MetadataValue.url(meta["source_url"]) if meta["source_url"] else "",
            "play": MetadataValue.url(media.source_url(s.media.base_url, job_id)),
            # measured and drawn while source.flac was encoded (no decode of it here)
            "loudness_lufs": meta["loudness_lufs"], "peak_dbfs": meta["peak_dbfs"],
            "waveform": MetadataValue.md(analysis.markdown_images(
                {"Source": (lib.track_dir(job_id) / meta["waveform"]).read_bytes()})),
        },
        data_version=DataVersion(meta["input_sha256"]))


def _models_identity(settings: SettingsResource) -> DataVersion:
    return DataVersion(stemset.settings_identity(settings.get().separation))


with warnings.catch_warnings():  # observable source assets are "beta" in Dagster 1.13
    warnings.simplefilter("ignore", BetaWarning)
    separation_models = observable_source_asset(
        group_name=GROUP, name="separation_models",
        description="The models the settings separate with (DEMUCS_MODEL, INSTRUMENTAL_MODEL: "
                    "names and checkpoint sha256), observed by the models sensor: a change "
                    "marks every track's stems stale (a backfill re-separates with the new "
                    "model only; stored stems of unchanged models are reused).")(_models_identity)


# No backfill policy (one track per run, in a backfill too): the step holds the "gpu" pool
# while it separates, and its data version is the track's own (source hash + models), where
# Dagster gives all partitions of a range run the one data version of the step's output.
@track_asset(
    deps=[source_audio, separation_models], pool="gpu", kinds={"demucs", "pytorch"},
    description="Stems stored losslessly (per model: stems/<job_id>/<model>/) so that "
                "variants can be re-mixed without separating again: DEMUCS_MODEL's "
                "(drums, bass, other, vocals) and, with INSTRUMENTAL_MODEL, the RoFormer "
                "model's. Its data version is the models' identities (name + checkpoint "
                "sha256) and the source's hash.")
def stems(context: AssetExecutionContext, config: VariantsConfig,
          settings: SettingsResource) -> MaterializeResult:
    s = settings.get()
    client = SeparatorClient.from_settings(s)
    lib = pipeline.Library.from_settings(s)
    try:
        with _stage(context, settings, "stems"):
            # the variants choose the models (demucs only for the drum variants)
            wanted = pipeline.track_variants(s.output, lib, context.partition_key,
                                             config.add_variants)
            meta = pipeline.separate_stems(lib, context.partition_key, client, wanted)
    except pipeline.TransientError as exc:
        # the service is unreachable or died mid-separation: Dagster retries the step (the
        # bundle stays claimed); after the last attempt the run fails with this message
        context.log.warning(str(exc))
        raise RetryRequested(max_retries=SERVICE_RETRIES,
                             seconds_to_wait=SERVICE_RETRY_WAIT_S) from exc
    return MaterializeResult(metadata={
        "sources": ", ".join(meta["sources"]), "model": meta["model"],
        "signature": meta["signature"], "device": meta["device"],
        "duration_s": meta["duration_s"], "separation_seconds": meta["separation_seconds"],
        "realtime_factor": round(meta["duration_s"] / max(meta["separation_seconds"], 1e-9), 2),
        "separated": ", ".join(meta["separated"]) or "none (stored stems reused)",
        "models": MetadataValue.json([{k: m.get(k) for k in ("name", "family", "architecture",
                                                               "sha256", "device", "precision")}
                                      for m in meta["models"]]),
    }, data_version=DataVersion(meta["data_version"]))


@track_asset(
    deps=[stems], kinds={"ffmpeg", "audio"}, backfill_policy=REMIX_BACKFILL,
    description="Instrumental variants mixed from the stored stems (instrumental, no drums, "
                "drums only, ...), encoded and tagged under outputs/<job_id>/files/audio/. "
                "Re-materializing it never re-runs separation.")
def variants(context: AssetExecutionContext, config: VariantsConfig,
             settings: SettingsResource) -> MaterializeResult:
    s = settings.get()
    lib = pipeline.Library.from_settings(s)
    return each_track(context, settings, "variants", lambda job_id, _: _make_variants(
        s, lib, job_id, config.add_variants))


def _make_variants(s, lib: pipeline.Library, job_id: str, add_variants: list[str]) -> dict:
    meta = pipeline.make_variants(s.output, lib, job_id, add_variants)
    out = lib.output_dir(job_id)
    audio_arts = [a for a in meta["artifacts"] if a["kind"] == "audio"]
    per_variant = {
        art["variant"]: {
            "file": art["path"], "bytes": art["size_bytes"],
            "title_tag": art["title_tag"], "gain_db": art["gain_db"],
            "loudness_lufs": art["loudness_lufs"], "peak_dbfs": art["peak_dbfs"],
            "replaygain_track_gain_db": art["replaygain_track_gain_db"],
            "replaygain_track_peak": art["replaygain_track_peak"]}
        for art in audio_arts}
    # the pictures drawn while the files were encoded (a track stored before they were
    # kept: drawn from its files)
    track = lib.track_dir(job_id)
    pictures = {"Source": _picture(track / pipeline.SOURCE_WAVEFORM, track / "source.flac",
                                   pipeline.SOURCE_WAVEFORM_COLOR)}
    instrumental = next((a for a in audio_arts if a["variant"] == "instrumental"), audio_arts[0])
    pictures[instrumental["label"]] = _picture(
        track / pipeline.VARIANT_WAVEFORM.format(variant=instrumental["variant"]),
        out / instrumental["path"], pipeline.VARIANT_WAVEFORM_COLOR)
    # links that play each file in the browser (the media server, `imaker media serve`)
    base = s.media.base_url
    links = {"play_source": MetadataValue.url(media.source_url(base, job_id))}
    links.update({f"play_{a['variant']}": MetadataValue.url(media.output_url(base, job_id, a["path"]))
                  for a in audio_arts})
    return {
        **links,
        "variants": ", ".join(a["variant"] for a in audio_arts),
        "per_variant": MetadataValue.json(per_variant),
        "total_bytes": sum(v["bytes"] for v in per_variant.values()),
        "format": meta["format"], "stems_preserved": meta["stems_preserved"],
        "waveforms": MetadataValue.md(analysis.markdown_images(pictures)),
    }


def _picture(stored, audio_file, color: str) -> bytes:
    try:
        return stored.read_bytes()
    except FileNotFoundError:
        return analysis.waveform_png(audio_file, color=color)


@track_asset(
    deps=[variants], kinds={"json"}, backfill_policy=REMIX_BACKFILL,
    description="outputs/<job_id>/manifest.json: every artifact with its sha256 and the "
                "provenance; written last, then the bundle is archived to done/.")
def manifest(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
    lib = pipeline.Library.from_settings(settings.get())

    def write(job_id: str, store: QueueStore) -> dict:
        result = pipeline.write_manifest(store, lib, job_id, drop_id(context),
                                         code_versions=CODE_VERSIONS)
        return {
            "path": MetadataValue.path(str(lib.output_dir(job_id) / "manifest.json")),
            "artifacts": len(result.artifacts),
            "total_bytes": sum(a.size_bytes for a in result.artifacts),
            "model": result.provenance["separation"]["model"],
        }

    return each_track(context, settings, "manifest", write)


track_assets = [source_audio, stems, variants, manifest]
CODE_VERSIONS = {a.key.to_user_string(): a.code_versions_by_key[a.key] for a in track_assets}
