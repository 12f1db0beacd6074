"""The code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here."""

from dagster import Definitions

from imaker.settings import Settings, load_settings
from resources import build_resources
from sensors import queue_sensor

from .assets import track_assets
from .catalog import catalog
from .checks import track_checks
from .jobs import ingest_track


def build_defs(settings: Settings | None = None) -> Definitions:
    """Definitions with resources configured from ``settings`` (default: the environment)."""
    return Definitions(
        assets=[*track_assets, catalog],
        asset_checks=track_checks,
        jobs=[ingest_track],
        sensors=[queue_sensor],
        resources=build_resources(settings or load_settings()),
    )


defs = build_defs()
