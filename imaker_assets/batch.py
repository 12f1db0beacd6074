"""``ingest_batch``: several queued tracks in one run (what the queue sensor requests when a
tick finds several new bundles).

The run's one op hands the tracks to ``operations.process_tracks``: long-lived worker
processes that pay the imports and the model load once per batch and run every track as
its own ``ingest_track`` run (same partition, lineage, metadata, checks and failure
isolation as a sensor run per track; the track runs show up in the UI next to the batch
run, tagged ``imaker/batch_run_id``). A failed track does not fail the batch run: it is in
``failed/`` with its reason and its own run is marked failed; the batch run's output
metadata lists it.
"""


import io

from dagster import Config, OpExecutionContext, Output, in_process_executor, job, op

from imaker.settings import load_settings


class BatchConfig(Config):
    job_ids: list[str]
    queues: list[str]


class _LogLines(io.TextIOBase):
    """A text stream that sends each line to the run's log."""

    def __init__(self, log):
        self.log, self.lines = log, []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.lines.append(line)
                (self.log.warning if ": failed: " in line or ": not finished" in line
                 else self.log.info)(line)
        return len(text)


@op(description="Process the listed queued tracks, each in its own ingest_track run, in "
                "worker processes that load the model once.")
def ingest_tracks(context: OpExecutionContext, config: BatchConfig):
    from .operations import process_tracks

    if len(config.job_ids) != len(config.queues):
        raise ValueError("job_ids and queues must have the same length")
    out = _LogLines(context.log)
    failures = process_tracks(context.instance, load_settings(),
                              list(zip(config.job_ids, config.queues)), out,
                              tags={"imaker/batch_run_id": context.run_id,
                                    "imaker/trigger": "ingest_batch"})
    failed = [line.split(":", 1)[0] for line in out.lines
              if ": failed: " in line or ": not finished" in line]
    yield Output(len(config.job_ids) - failures, metadata={
        "tracks": len(config.job_ids), "succeeded": len(config.job_ids) - failures,
        "failed": ", ".join(failed) or "none"})


@job(executor_def=in_process_executor,
     description="Several queued tracks in one run: imports and the model load paid once "
                 "per batch; every track still gets its own ingest_track run.")
def ingest_batch():
    ingest_tracks()
