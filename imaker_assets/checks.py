"""Per-track asset checks, shown beside each partition in the UI.

The checks on `variants` are blocking (one multi-check: each published variant is decoded
once for the three of them): when one fails, `manifest` (and so done/ and the
NAS copy) does not run, the run fails, and the bundle goes to failed/ with the check's
description as the reason (``imaker_assets.lifecycle.failure_reason``)."""

import warnings

from dagster import (AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity,
                     AssetCheckSpec, asset_check, multi_asset_check)

from imaker import analysis
from imaker.pipeline import MANIFEST_FILES, Library, StageError
from resources import SettingsResource

from .assets import manifest, variants
from .partitions import tracks

warnings.filterwarnings("ignore", message=".*partitions_def.*", category=Warning)


def _result(outcome: analysis.CheckOutcome, **kwargs) -> AssetCheckResult:
    return AssetCheckResult(passed=outcome.passed, severity=AssetCheckSeverity.ERROR, **kwargs,
                            description=outcome.description,
                            metadata={"details": outcome.details} if outcome.details else {})


#: the blocking checks of `variants` (name: (what ``analysis.check_variants`` calls it, the
#: description users see))
VARIANT_CHECKS = {
    "variants_match_source_duration": ("duration",
                                       "Every variant lasts as long as the source (± 50 ms)."),
    "variants_do_not_clip": ("clipping", "No variant clips (sample peak ≤ 0 dBFS)."),
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
    job_id = context.partition_key
    lib = Library.from_settings(settings.get())
    arts = lib.read_json(job_id, "variants.json")["artifacts"]
    source = lib.read_json(job_id, "source.json")
    outcomes = analysis.check_variants(
        lib.output_dir(job_id), arts, source["duration_s"],
        samplerate=source.get("sample_rate") or 44100, channels=source.get("channels") or 2)
    for name, (which, _) in VARIANT_CHECKS.items():
        yield _result(outcomes[which], check_name=name, asset_key=variants.key)


@asset_check(asset=manifest, partitions_def=tracks,
             description="manifest.json validates against its schema and every listed file "
                         "exists with the listed sha256 (a file whose size and mtime are "
                         "those recorded when the manifest was written is trusted without "
                         "hashing it again; any other is hashed).")
def manifest_matches_files(context: AssetCheckExecutionContext,
                           settings: SettingsResource) -> AssetCheckResult:
    lib = Library.from_settings(settings.get())
    job_id = context.partition_key
    try:
        listed = lib.read_json(job_id, MANIFEST_FILES).get("files")
    except StageError:  # a manifest written before it was recorded: every file is hashed
        listed = None
    return _result(analysis.check_manifest(lib.output_dir(job_id), listed))


track_checks = [variants_checks, manifest_matches_files]
