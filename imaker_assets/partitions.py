import warnings

from dagster import BackfillPolicy, DynamicPartitionsDefinition

#: one partition per track; the key is the bundle's job_id
tracks = DynamicPartitionsDefinition(name="tracks")

#: Tracks per run when many are backfilled (`imaker backfill`, a UI backfill of `variants`,
#: `manifest`, `nas_copy`): Dagster's backfill policy cuts the selected partitions into runs
#: of at most this many (a partition-key range each). A run has a fixed cost (its start, the
#: in-process executor, each step's events and the asset records it reads:
#: benchmarks/bench_backfill.py), a re-mix of a track a few CPU-seconds, so 8 makes that
#: overhead small while one bad track holds back the manifests of at most 7 others (a step
#: fails for its whole range, see ``assets.each_track``). The queue sensor's runs are one
#: track each, as before.
TRACKS_PER_BACKFILL_RUN = 8
REMIX_BACKFILL = BackfillPolicy.multi_run(TRACKS_PER_BACKFILL_RUN)

# source_audio and stems keep one track per run (no policy) and the re-mix chain has
# REMIX_BACKFILL, so Dagster warns whenever it resolves a job holding both (`ingest_track`,
# `materialize` of the track assets) and gives that job the smallest: one partition per run,
# which is what `ingest_track` is. Expected, so not shown.
warnings.filterwarnings("ignore", message=r"Asset job .* materializes assets with varying "
                                          r"BackfillPolicies", category=UserWarning)
