"""The retriever contract (no Dagster).

A retriever turns *targets* (URLs, paths, ids — whatever its source understands) into job
bundles in a queue folder. It never writes a bundle itself: it hands files and a ``job.json``
dict to :class:`~imaker.retrievers.writer.BundleWriter`, which builds ``job_<id>.tmp/``,
validates it like the processor will, fsyncs and renames it to ``job_<id>/`` atomically,
and records the source id so the same source is not queued twice (unless forced).

Write one for a new source by subclassing :class:`Retriever`::

    class MyRetriever(Retriever):
        name = "mysource"
        description = "Tracks from mysource.example"
        source_type = "mysource"

        def retrieve_one(self, target):
            path = download_somehow(target, self.staging_dir())
            yield self.write(queue="other", job={...}, files={"audio.m4a": path},
                             source_key=f"mysource:{track_id}", target=target)

and register it in your package's ``pyproject.toml``::

    [project.entry-points."imaker.retrievers"]
    mysource = "my_package.module:MyRetriever"

``imaker retrieve --list`` lists it and ``imaker retrieve mysource TARGET...`` runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Iterable, Mapping

from ..bundle import JOB_ID_RE, BundleError
from ..fsutil import dir_mode
from ..settings import Settings
from .writer import BundleWriter, DuplicateJob, SeenIndex

QUEUED, DUPLICATE, SKIPPED = "queued", "duplicate", "skipped"  # fine
REJECTED, FAILED = "rejected", "failed"  # the target (or entry) did not become a bundle


class RetrieverError(RuntimeError):
    """A target that cannot be retrieved; the message is for a person."""


class Rejected(RetrieverError):
    """The media was retrieved but fails a check (e.g. its duration); no bundle is written."""


@dataclass
class Outcome:
    """What happened to one target (or one entry of a playlist target)."""

    target: str
    status: str  # queued | duplicate | skipped | rejected | failed
    job_id: str | None = None
    queue: str | None = None
    path: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in (QUEUED, DUPLICATE, SKIPPED)

    def line(self) -> str:
        """One human-readable line, as the CLI prints it."""
        who = self.job_id or "-"
        if self.status == QUEUED:
            return f"{self.target}: queued {who} -> {self.path}"
        if self.status in (DUPLICATE, SKIPPED):
            return f"{self.target}: {self.status} {who}: {self.message}"
        return f"{self.target}: {self.status}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrieveContext:
    """What every retriever gets: the settings, the shared writer, and the run's switches."""

    settings: Settings
    force: bool = False
    log: Callable[[str], None] = lambda msg: None
    #: called with every outcome as soon as it is known (progress for long playlists)
    on_outcome: Callable[["Outcome"], None] = lambda outcome: None
    #: free-form facts recorded in every bundle's ``retriever`` block (e.g. a Dagster run id)
    provenance: dict[str, Any] = field(default_factory=dict)
    _writer: BundleWriter | None = None

    @property
    def state_dir(self) -> Path:
        return self.settings.paths.data_dir / "retrievers"

    @property
    def writer(self) -> BundleWriter:
        if self._writer is None:
            self._writer = BundleWriter(SeenIndex(self.state_dir / "seen.sqlite"))
        return self._writer

    def queue_dir(self, queue: str) -> Path:
        try:
            return self.settings.paths.queues[queue]
        except KeyError:
            raise RetrieverError(f"unknown queue {queue!r}; one of "
                                 f"{', '.join(self.settings.paths.queues)}") from None


class Retriever:
    """Base class of every retriever (built in or registered through the
    ``imaker.retrievers`` entry-point group). Subclasses set ``name``, ``description`` and
    ``source_type`` and implement :meth:`retrieve_one`; options come as keyword arguments
    (from the CLI's ``--option KEY=VALUE`` or the Dagster job's config)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    source_type: ClassVar[str] = "other"

    def __init__(self, ctx: RetrieveContext, **options: Any):
        if options:
            raise RetrieverError(f"retriever {self.name!r} takes no option(s) "
                                 f"{', '.join(sorted(options))}")
        self.ctx = ctx

    # ----- to implement ---------------------------------------------------------------
    def retrieve_one(self, target: str) -> Iterable[Outcome]:
        raise NotImplementedError

    # ----- provided -------------------------------------------------------------------
    def retrieve(self, targets: Iterable[str]) -> list[Outcome]:
        """Every target, in order; a failing target is reported and the others go on."""
        outcomes: list[Outcome] = []
        for target in targets:
            try:
                for outcome in self.retrieve_one(target):
                    outcomes.append(outcome)
                    self.ctx.on_outcome(outcome)
            except Exception as exc:  # noqa: BLE001 - reported per target, the rest continue
                outcome = Outcome(target, REJECTED if isinstance(exc, Rejected) else FAILED,
                                  message=describe(exc))
                outcomes.append(outcome)
                self.ctx.on_outcome(outcome)
        return outcomes

    def staging_dir(self) -> "_Staging":
        """A private scratch folder under ``$IMAKER_DATA/retrievers/staging`` (same
        filesystem as the data root, so moving files out of it is cheap); removed on exit."""
        return _Staging(self.ctx.state_dir / "staging")

    def is_seen(self, source_key: str) -> dict | None:
        if self.ctx.force:
            return None
        return self.ctx.writer.index.get(source_key) if self.ctx.writer.index else None

    def duplicate(self, label: str, source_key: str, what: str = "") -> "Outcome | None":
        """The DUPLICATE outcome when ``source_key`` was queued before (and not --force)."""
        seen = self.is_seen(source_key)
        if seen is None:
            return None
        return Outcome(label, DUPLICATE, job_id=seen["job_id"], queue=seen["queue"],
                       message=f"{what}queued as {seen['job_id']} at {seen['at']} "
                               "(use --force to queue it again)")

    def write(self, *, queue: str, job: Mapping[str, Any], files: Mapping[str, Path],
              source_key: str | None, target: str,
              move: bool | Collection[str] = True) -> Outcome:
        """Write one bundle through the shared writer and describe the result."""
        job = dict(job)
        job.setdefault("schema_version", 1)
        job.setdefault("source_type", self.source_type)
        block = dict(job.get("retriever") or {})
        block.setdefault("name", self.name)
        block.update(self.ctx.provenance)
        job["retriever"] = block
        try:
            path = self.ctx.writer.write(self.ctx.queue_dir(queue), job, files,
                                         source_key=source_key, force=self.ctx.force, move=move)
        except DuplicateJob as exc:
            return Outcome(target, DUPLICATE, job_id=job.get("job_id"), queue=queue,
                           message=str(exc))
        return Outcome(target, QUEUED, job_id=job["job_id"], queue=queue, path=str(path))


class _Staging:
    def __init__(self, root: Path):
        self.root = root

    def __enter__(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="stage-", dir=self.root))
        os.chmod(self.path, dir_mode())  # mkdtemp's 0700 would follow the bundle everywhere
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (RetrieverError, BundleError)):
        return text
    return f"{type(exc).__name__}: {text}"


_SLUG_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str, max_len: int = 60) -> str:
    """A job-id-safe fragment of ``text`` ("AC/DC - Back in Black" -> "AC_DC_-_Back_in_Black")."""
    out = _SLUG_BAD.sub("_", text).strip("._-")
    return out[:max_len].rstrip("._-")


def make_job_id(*parts: str) -> str:
    """Join slugged parts with ``_`` into a valid job id (at most 128 characters)."""
    pieces = [p for p in (slug(str(x), 80) for x in parts) if p]
    job_id = "_".join(pieces)[:128].rstrip("._-")
    if not JOB_ID_RE.match(job_id):
        raise RetrieverError(f"cannot make a valid job id from {parts!r}")
    return job_id
