"""Notification sensors (``NOTIFY_URLS``): Dagster run status sensors on `ingest_track`,
one per final run status, each with its own cursor so every run outcome is notified once
(``imaker_assets.notifications`` decides what to say, ``imaker.notify`` sends it)."""

from dagster import DefaultSensorStatus, RunStatusSensorContext, run_status_sensor

from resources import SettingsResource
from imaker_assets.jobs import ingest_track
from imaker_assets.notifications import NOTIFY_SENSORS, handle_run

_WHAT = {"notify_done": "is done (title, variants, output folder)",
         "notify_failed": "has failed for good (the reason; not a run Dagster will retry)",
         "notify_canceled": "was canceled"}


def _notify_sensor(name: str):
    @run_status_sensor(
        name=name, run_status=NOTIFY_SENSORS[name], monitored_jobs=[ingest_track],
        minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING,
        description=f"Sends a message to NOTIFY_URLS (Apprise) when a track {_WHAT[name]}. "
                    "Does nothing while NOTIFY_URLS is empty; a receiver that is down is a "
                    "warning in this sensor's log, never a failure of the track.")
    def _sensor(context: RunStatusSensorContext, settings: SettingsResource):
        handle_run(context.instance, context.dagster_run, settings.get(), context.log)
        # None (not a SkipReason): the sensor goes on with the next finished run this tick

    return _sensor


notify_done, notify_failed, notify_canceled = (_notify_sensor(n) for n in NOTIFY_SENSORS)
notify_sensors = [notify_done, notify_failed, notify_canceled]
