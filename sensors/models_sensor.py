"""Observes which models the settings separate with (``separation_models``): when
DEMUCS_MODEL or INSTRUMENTAL_MODEL (or a checkpoint on disk) changes, the new identity is
recorded as that source asset's data version, and Dagster shows every track's stems stale."""

from dagster import (AssetObservation, DefaultSensorStatus, SensorEvaluationContext,
                     SensorResult, SkipReason, sensor)
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from imaker import stemset
from imaker_assets.assets import separation_models
from resources import SettingsResource


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        asset_selection=[separation_models],
        description="Records the models the settings separate with (names + checkpoint "
                    "sha256) when they change: the tracks' stems then show stale.")
def models_sensor(context: SensorEvaluationContext, settings: SettingsResource):
    identity = stemset.settings_identity(settings.get().separation)
    if identity == context.cursor:
        return SkipReason(f"models unchanged: {identity}")
    return SensorResult(
        asset_events=[AssetObservation(separation_models.key, tags={DATA_VERSION_TAG: identity},
                                       metadata={"models": identity})],
        cursor=identity)
