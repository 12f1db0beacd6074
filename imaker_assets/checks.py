"""Per-track asset checks, shown beside each partition in the UI.

The checks on `variants` are blocking (one multi-check: each published variant is decoded
once for the three of them): when one fails, `manifest` (and so done/ and the
NAS copy) does not run, the run fails, and the bundle goes to failed/ with the check's
description as the reason (``imaker_assets.lifecycle.failure_reason``).

A run of several tracks (a backfill: ``partitions.REMIX_BACKFILL``) checks every track of its
range and records one evaluation per check *per track* (its partition). Dagster's own
``AssetCheckResult`` cannot do that: in a range run it is recorded without a partition and
a check's output is yielded once (Dagster 1.13), so the checks yield one
``AssetCheckEvaluation`` per track — with the partition and the materialization it checked,
as Dagster fills them for one partition — and then the check's output. A failed blocking
check still fails the step, so a range with one bad track writes no manifest for any of them
(Dagster gates per step, not per partition); each track's own evaluation says which one.
Sensor runs are one track: the same loop, once."""

import warnings

from dagster import (AssetCheckEvaluation, AssetCheckExecutionContext, AssetCheckKey,
                     AssetCheckSeverity, AssetCheckSpec, AssetRecordsFilter, Output, asset_check,
                     multi_asset_check)
# Not exported by Dagster (pinned 1.13.27): the pointer from a check evaluation to the
# materialization it checked, which AssetCheckResult fills for a one-partition run
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData)

from imaker import analysis
from imaker.pipeline import MANIFEST_FILES, Library, StageError
from resources import SettingsResource

from .assets import manifest, variants
from .partitions import tracks

warnings.filterwarnings("ignore", message=".*partitions_def.*", category=Warning)


#: ``CheckOutcome.severity`` -> Dagster's (a blocking check stops its run only on ERROR)
_SEVERITY = {"error": AssetCheckSeverity.ERROR, "warn": AssetCheckSeverity.WARN}


def _evaluations(context: AssetCheckExecutionContext, job_id: str,
                 outcomes: dict[AssetCheckKey, analysis.CheckOutcome]):
    """One track's evaluation of each check, on its partition, blocking as its spec says."""
    specs = {spec.key: spec for spec in context.check_specs}
    for key, outcome in outcomes.items():
        latest = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=key.asset_key, asset_partitions=[job_id]), limit=1).records
        target = (AssetCheckEvaluationTargetMaterializationData(
            storage_id=latest[0].storage_id, run_id=latest[0].run_id,
            timestamp=latest[0].timestamp) if latest else None)
        yield AssetCheckEvaluation(
            asset_key=key.asset_key, check_name=key.name, passed=outcome.passed,
            severity=_SEVERITY[outcome.severity], description=outcome.description,
            metadata={"details": outcome.details} if outcome.details else {},
            partition=job_id, blocking=specs[key].blocking,
            target_materialization_data=target)


def _per_track(context: AssetCheckExecutionContext, check_track):
    """``check_track(job_id)`` -> {check key: outcome} for every track of the run, then the
    checks' outputs (each once per step). A failed blocking evaluation fails the step
    after every track was checked."""
    for job_id in context.partition_keys:
        yield from _evaluations(context, job_id, check_track(job_id))
    assets_def = context.op_execution_context.assets_def
    for spec in context.check_specs:
        yield Output(None, output_name=assets_def.get_output_name_for_asset_check_key(spec.key))


#: the blocking checks of `variants` (name: (what ``analysis.check_variants`` calls it, the
#: description users see))
VARIANT_CHECKS = {
    "variants_match_source_duration": ("duration",
                                       "Every variant lasts as long as the source (± 50 ms)."),
    "variants_do_not_clip": ("clipping", "No variant clips: the mix sent to the encoder and "
                                         "the decoded file stay ≤ 0 dBFS (a lossy codec's "
                                         "overshoot from an unclipped mix is a warning)."),
    "variants_are_not_silent": ("silence", "No variant is silent (RMS above −60 dBFS)."),
}


@multi_asset_check(
    name="variants_checks",
    specs=[AssetCheckSpec(name, asset=variants, blocking=True, description=description,
                          partitions_def=tracks)
           for name, (_, description) in VARIANT_CHECKS.items()],
    description="The blocking checks of the published variants, from one decode of each "
                "file (its duration, sample peak and RMS).")
def variants_checks(context: AssetCheckExecutionContext, settings: SettingsResource):
    lib = Library.from_settings(settings.get())

    def check(job_id: str) -> dict[AssetCheckKey, analysis.CheckOutcome]:
        arts = lib.read_json(job_id, "variants.json")["artifacts"]
        source = lib.read_json(job_id, "source.json")
        outcomes = analysis.check_variants(
            lib.output_dir(job_id), arts, source["duration_s"],
            samplerate=source.get("sample_rate") or 44100, channels=source.get("channels") or 2)
        return {AssetCheckKey(variants.key, name): outcomes[which]
                for name, (which, _) in VARIANT_CHECKS.items()}

    yield from _per_track(context, check)


@asset_check(asset=manifest, partitions_def=tracks,
             description="manifest.json validates against its schema and every listed file "
                         "exists with the listed sha256 (a file whose size and mtime are "
                         "those recorded when the manifest was written is trusted without "
                         "hashing it again; any other is hashed).")
def manifest_matches_files(context: AssetCheckExecutionContext, settings: SettingsResource):
    lib = Library.from_settings(settings.get())

    def check(job_id: str) -> dict[AssetCheckKey, analysis.CheckOutcome]:
        try:
            listed = lib.read_json(job_id, MANIFEST_FILES).get("files")
        except StageError:  # a manifest written before it was recorded: every file is hashed
            listed = None
        return {AssetCheckKey(manifest.key, "manifest_matches_files"):
                analysis.check_manifest(lib.output_dir(job_id), listed)}

    yield from _per_track(context, check)


track_checks = [variants_checks, manifest_matches_files]
