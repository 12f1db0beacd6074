from dagster import AssetSelection, define_asset_job, in_process_executor

from .assets import track_assets
from .nas import nas_copy

#: source_audio -> stems -> variants -> manifest -> nas_copy (+ checks) for one track.
#: In-process executor: one process per run pays the imports (torch, demucs, dagster) and
#: the model load once, instead of once per step subprocess.
ingest_track = define_asset_job(
    "ingest_track", selection=AssetSelection.assets(*track_assets, nas_copy),
    executor_def=in_process_executor,
    description="Process one queued track end to end (one partition of `tracks`).")
