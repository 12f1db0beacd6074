"""Retrievers: turn a URL or a file into a job bundle in the right queue (no Dagster).

* :mod:`.base` — the contract (:class:`Retriever`, :class:`RetrieveContext`, :class:`Outcome`)
* :mod:`.writer` — the one atomic bundle writer and the index of seen sources
* :mod:`.registry` — built-in retrievers plus the ``imaker.retrievers`` entry-point group
* :mod:`.youtube`, :mod:`.deezer`, :mod:`.local` — the built-in retrievers
* :mod:`.cli` — ``imaker retrieve ...`` and ``imaker import ...``
"""

from .base import (DUPLICATE, FAILED, QUEUED, REJECTED, SKIPPED, Outcome, Rejected,
                   RetrieveContext,
                   Retriever, RetrieverError, make_job_id, slug)
from .writer import BundleWriteError, BundleWriter, DuplicateJob, SeenIndex

__all__ = ["Retriever", "RetrieveContext", "Outcome", "RetrieverError", "Rejected",
           "BundleWriter", "BundleWriteError", "DuplicateJob", "SeenIndex", "make_job_id",
           "slug", "QUEUED", "DUPLICATE", "SKIPPED", "REJECTED", "FAILED"]
