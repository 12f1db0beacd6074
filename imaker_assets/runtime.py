"""Glue between a Dagster run and the domain queue store."""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRunStatus

from imaker.queues import Claim, Owner

_FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def claim_alive(instance: DagsterInstance):
    """A claim is alive while its Dagster run is unfinished and (on this host) its process
    or a successor step has been seen recently."""

    def is_alive(claim: Claim) -> bool:
        if claim.run_id:
            run = instance.get_run_by_id(claim.run_id)
            if run is None or run.status in _FINISHED:
                return False
        alive = claim.process_alive()
        return True if alive is None else alive

    return is_alive


def owner_for(context) -> Owner:
    return Owner.current(run_id=context.run.run_id)
