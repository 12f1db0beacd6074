from dagster import AssetSelection, define_asset_job, in_process_executor

from .assets import track_assets
from .nas import nas_copy

#: source_audio -> stems -> variants -> manifest -> nas_copy (+ checks) for one track.
#: In-process executor: one process per run pays the imports (dagster, numpy, our modules)
#: once, instead of once per step subprocess. A run never loads the model (nor imports
#: torch): its `stems` step asks the separation service, which holds it.
ingest_track = define_asset_job(
    "ingest_track", selection=AssetSelection.assets(*track_assets, nas_copy),
    executor_def=in_process_executor,
    description="Process one queued track end to end (one partition of `tracks`).")
