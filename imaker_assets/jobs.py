from dagster import AssetSelection, define_asset_job

from .assets import track_assets
from .nas import nas_copy

#: source_audio -> stems -> variants -> manifest for one track (partition)
ingest_track = define_asset_job(
    "ingest_track", selection=AssetSelection.assets(*track_assets, nas_copy),
    description="Process one queued track end to end (one partition of `tracks`).")

