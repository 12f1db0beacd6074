"""The code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here."""

import os

from dagster import Definitions

from imaker.fsutil import apply_umask
from imaker.settings import Settings, load_settings
from resources import build_resources
from sensors import models_sensor, notify_sensors, queue_sensor
from sensors.queue_sensor import INGEST_ONLY_ENV

from .assets import separation_models, track_assets
from .catalog import catalog, catalog_automation
from .checks import track_checks
from .jobs import ingest_track
from .nas import nas_copy
from .retrieve import retrieve


def build_defs(settings: Settings | None = None) -> Definitions:
    """Definitions with resources configured from ``settings`` (default: the environment).
    Applies the ``UMASK`` setting to this process (the code server, every run)."""
    settings = settings or load_settings()
    apply_umask(settings.paths.umask)
    # The notification sensors exist where NOTIFY_URLS is set (read when the code location
    # loads, like every setting): three run status sensors ticking every 5 s to send nothing were
    # most of an idle stack's CPU (each tick a gRPC call, a DagsterInstance built in the
    # code server, a tick written by the daemon).
    notify = list(notify_sensors) if settings.notify.urls else []
    return Definitions(
        assets=[*track_assets, separation_models, nas_copy, catalog],
        asset_checks=track_checks,
        jobs=[ingest_track, retrieve],
        # the daemon that `imaker ingest` starts only drives its claims (it refreshes the
        # catalog itself when its jobs are done) and notifies their outcomes (NOTIFY_URLS)
        sensors=([queue_sensor, *notify] if os.environ.get(INGEST_ONLY_ENV) == "1"
                 else [queue_sensor, *notify, catalog_automation, models_sensor]),
        resources=build_resources(settings),
    )


defs = build_defs()
