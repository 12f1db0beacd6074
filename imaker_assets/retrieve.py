"""The ``retrieve`` job: paste URLs in the launchpad, its run writes job bundles into the
queues, and ``queue_sensor`` picks them up (one ``tracks`` partition and run per bundle).

Launchpad config::

    ops:
      retrieve_bundles:
        config:
          source: youtube          # youtube | deezer | import | a plugin name
          urls: ["https://www.youtube.com/watch?v=..."]
          mode: audio              # youtube only: audio | video | both ("" = YTDL_MODE)
          force: false             # queue sources that were queued before

Every bundle records the run in ``job.json``'s ``retriever.dagster_run_id``. The run fails
(after writing every good bundle) when any URL failed or was rejected.
"""

from dagster import Config, Failure, MetadataValue, OpExecutionContext, Output, job, op

from imaker.retrievers.cli import run_retriever
from resources import SettingsResource


class RetrieveConfig(Config):
    source: str = "youtube"
    urls: list[str]
    mode: str = ""
    force: bool = False


@op(description="Run a retriever over the URLs; each good one becomes a job bundle in its queue.")
def retrieve_bundles(context: OpExecutionContext, config: RetrieveConfig,
                     settings: SettingsResource) -> Output[list]:
    options = {"mode": config.mode} if config.mode and config.source == "youtube" else {}
    outcomes = run_retriever(
        config.source, list(config.urls), settings.get(), force=config.force, options=options,
        log=context.log.warning, on_outcome=lambda o: context.log.info(o.line()),
        provenance={"dagster_run_id": context.run_id})
    rows = [o.to_dict() for o in outcomes]
    queued = [o for o in outcomes if o.status == "queued"]
    bad = [o for o in outcomes if not o.ok]
    table = "\n".join(["| target | status | job | message |", "|---|---|---|---|"] +
                      [f"| {o.target} | {o.status} | {o.job_id or ''} | "
                       f"{(o.message or o.path or '').replace('|', '/')} |" for o in outcomes])
    metadata = {"queued": len(queued), "failed": len(bad),
                "job_ids": [o.job_id for o in queued],
                "outcomes": MetadataValue.md(table)}
    if bad or not outcomes:
        raise Failure(description=f"{len(bad)} of {len(outcomes)} target(s) did not become "
                                  "bundles: " + "; ".join(o.line() for o in bad[:5]),
                      metadata=metadata)
    return Output(rows, metadata=metadata)


@job(name="retrieve", description="Download URLs (YouTube, Deezer, local paths, plugins) as job "
                                  "bundles into the queues; the queue sensor then processes them.",
     tags={"imaker/kind": "retrieve"})
def retrieve():
    retrieve_bundles()
