"""Per-track assets: source_audio -> stems -> variants -> manifest.

Each asset is a thin call into ``imaker.pipeline``; the files live in the library, the
stems store and outputs/, and the assets report metadata about them. A failure in any
stage archives the job to ``failed/`` with the stage and reason.
"""


from contextlib import contextmanager

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imaker import pipeline
from resources import LibraryResource, QueueResource, SeparatorResource

from .partitions import tracks
from .runtime import claim_alive, owner_for

GROUP = "tracks"


@contextmanager
def _stage(context: AssetExecutionContext, queues: QueueResource, stage: str):
    """Mark the job's claim as worked on by this step; archive the job to failed/ if the
    stage raises."""
    store = queues.store()
    store.touch(context.partition_key, owner_for(context))
    with pipeline.failing_to_archive(store, context.partition_key, stage):
        yield store


@asset(partitions_def=tracks, group_name=GROUP, code_version="1", kinds={"ffmpeg", "audio"},
       description="The bundle's audio, validated and decoded to 44.1 kHz stereo FLAC in the "
                   "track library. Claims the bundle from its queue.")
def source_audio(context: AssetExecutionContext, queues: QueueResource,
                 library: LibraryResource) -> MaterializeResult:
    job_id = context.partition_key
    meta = pipeline.prepare_source(queues.store(), library.library(), job_id, owner_for(context),
                                   claim_alive(context.instance),
                                   tolerance=library.duration_tolerance)
    return MaterializeResult(
        metadata={
            "duration_s": meta["duration_s"], "sample_rate": meta["sample_rate"],
            "channels": meta["channels"], "input_sha256": meta["input_sha256"],
            "input_codec": meta["input_codec"] or "unknown", "source_type": meta["source_type"],
            "source_url": MetadataValue.url(meta["source_url"]) if meta["source_url"] else "",
            "title": meta["original_bundle"]["title"], "artist": meta["original_bundle"]["artist"],
        })


@asset(partitions_def=tracks, group_name=GROUP, deps=[source_audio], code_version="1",
       pool="gpu", kinds={"demucs", "pytorch"},
       description="Demucs stems (drums, bass, other, vocals), stored losslessly so that "
                   "variants can be re-mixed without separating again.")
def stems(context: AssetExecutionContext, queues: QueueResource, library: LibraryResource,
          separator: SeparatorResource) -> MaterializeResult:
    with _stage(context, queues, "stems"):
        meta = pipeline.separate_stems(library.library(), context.partition_key, separator)
    return MaterializeResult(metadata={
        "sources": ", ".join(meta["sources"]), "model": meta["model"],
        "signature": meta["signature"], "device": meta["device"],
        "duration_s": meta["duration_s"], "separation_seconds": meta["separation_seconds"],
        "realtime_factor": round(meta["duration_s"] / max(meta["separation_seconds"], 1e-9), 2),
    })


@asset(partitions_def=tracks, group_name=GROUP, deps=[stems], code_version="1",
       kinds={"ffmpeg", "audio"},
       description="Instrumental variants mixed from the stored stems (instrumental, no drums, "
                   "drums only, ...), encoded and tagged under outputs/<job_id>/files/audio/.")
def variants(context: AssetExecutionContext, queues: QueueResource,
             library: LibraryResource) -> MaterializeResult:
    with _stage(context, queues, "variants"):
        meta = pipeline.make_variants(library.output_options(), library.library(),
                                      context.partition_key)
    return MaterializeResult(metadata={
        "variants": ", ".join(a["variant"] for a in meta["artifacts"] if a["kind"] == "audio"),
        "files": MetadataValue.json([a["path"] for a in meta["artifacts"]]),
        "format": meta["format"], "stems_preserved": meta["stems_preserved"],
    })


@asset(partitions_def=tracks, group_name=GROUP, deps=[variants], code_version="1",
       kinds={"json"},
       description="outputs/<job_id>/manifest.json: every artifact with its sha256 and the "
                   "provenance; written last, then the bundle is archived to done/.")
def manifest(context: AssetExecutionContext, queues: QueueResource,
             library: LibraryResource) -> MaterializeResult:
    job_id = context.partition_key
    lib = library.library()
    with _stage(context, queues, "manifest") as store:
        result = pipeline.write_manifest(store, lib, job_id)
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(lib.output_dir(job_id) / "manifest.json")),
        "artifacts": len(result.artifacts),
        "total_bytes": sum(a.size_bytes for a in result.artifacts),
        "model": result.provenance["separation"]["model"],
    })


track_assets = [source_audio, stems, variants, manifest]
