"""Per-track asset checks, shown beside each partition in the UI.

The checks on `variants` are blocking: when one fails, `manifest` (and so done/ and the
NAS copy) does not run, the run fails, and the bundle goes to failed/ with the check's
description as the reason (``imaker_assets.lifecycle.failure_reason``)."""

import warnings

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from imaker import analysis
from imaker.pipeline import Library
from resources import SettingsResource

from .assets import manifest, variants
from .partitions import tracks

warnings.filterwarnings("ignore", message=".*partitions_def.*", category=Warning)


def _result(outcome: analysis.CheckOutcome) -> AssetCheckResult:
    return AssetCheckResult(passed=outcome.passed, severity=AssetCheckSeverity.ERROR,
                            description=outcome.description,
                            metadata={"details": outcome.details} if outcome.details else {})


def _variant_files(settings: SettingsResource, job_id: str):
    lib = Library.from_settings(settings.get())
    return lib, lib.read_json(job_id, "variants.json")["artifacts"]


@asset_check(asset=variants, partitions_def=tracks, blocking=True,
             description="Every variant lasts as long as the source (± 50 ms).")
def variants_match_source_duration(context: AssetCheckExecutionContext,
                                   settings: SettingsResource) -> AssetCheckResult:
    lib, arts = _variant_files(settings, context.partition_key)
    source = lib.read_json(context.partition_key, "source.json")["duration_s"]
    return _result(analysis.check_durations(lib.output_dir(context.partition_key), arts, source))


def _levels_check(name: str, which: int, description: str):
    """A blocking check on `variants` from ``analysis.check_levels`` (0: clipping, 1: silence)."""
    @asset_check(name=name, asset=variants, partitions_def=tracks, blocking=True,
                 description=description)
    def _check(context: AssetCheckExecutionContext,
               settings: SettingsResource) -> AssetCheckResult:
        lib, arts = _variant_files(settings, context.partition_key)
        return _result(analysis.check_levels(lib.output_dir(context.partition_key), arts)[which])
    return _check


variants_do_not_clip = _levels_check("variants_do_not_clip", 0,
                                     "No variant clips (sample peak ≤ 0 dBFS).")
variants_are_not_silent = _levels_check("variants_are_not_silent", 1,
                                        "No variant is silent (RMS above −60 dBFS).")


@asset_check(asset=manifest, partitions_def=tracks,
             description="manifest.json validates against its schema and every listed file "
                         "exists with the listed sha256.")
def manifest_matches_files(context: AssetCheckExecutionContext,
                           settings: SettingsResource) -> AssetCheckResult:
    return _result(analysis.check_manifest(
        Library.from_settings(settings.get()).output_dir(context.partition_key)))


track_checks = [variants_match_source_duration, variants_do_not_clip, variants_are_not_silent,
                manifest_matches_files]
