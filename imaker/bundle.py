"""Job bundle and manifest contracts (no Dagster).

A *job bundle* is a folder ``job_<id>/`` holding ``job.json`` plus the media it names.
Retrievers produce them; the processor consumes them. A *manifest* is what the processor
writes to ``outputs/<job_id>/manifest.json`` when a job is done. JSON Schemas for both are
published in ``imaker/schemas/`` (``schema_path("job")``, ``schema_path("manifest")``).
"""

from __future__ import annotations

import json
import math
import os
import stat
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema

from .fsutil import write_json_atomic
from .variants import VARIANTS

SCHEMA_VERSION = 1
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
BUNDLE_PREFIX = "job_"
MAX_JOB_JSON_BYTES = 256 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MANIFEST_FILE = "manifest.json"
_SCHEMA_DIR = Path(__file__).with_name("schemas")


class BundleError(ValueError):
    """A job bundle that cannot be processed; the message says why, for a person."""


def schema_path(name: str) -> Path:
    return _SCHEMA_DIR / f"{name}.schema.json"


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(schema_path(name).read_text())
    return jsonschema.Draft202012Validator(schema)


def schema_errors(name: str, data: Any) -> list[str]:
    """Human-readable schema violations of ``data`` against schema ``name`` (job|manifest)."""
    out = []
    for err in sorted(_validator(name).iter_errors(data), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        msg = err.message
        if len(msg) > 200:
            msg = msg[:200] + "…"
        out.append(f"{where}: {msg}")
    return out


def job_id_from_folder(name: str) -> str | None:
    """``job_<id>`` -> ``<id>`` when the id is valid, else None."""
    if not name.startswith(BUNDLE_PREFIX):
        return None
    job_id = name[len(BUNDLE_PREFIX):]
    return job_id if JOB_ID_RE.match(job_id) else None


def _reject_constant(value: str):
    raise BundleError(f"job.json: {value} is not valid JSON")


@dataclass
class YouTubeMetadata:
    video_id: str
    url: str
    channel: str | None = None
    duration_online_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "YouTubeMetadata":
        known = {"video_id", "url", "channel", "duration_online_s"}
        return cls(video_id=data["video_id"], url=data["url"], channel=data.get("channel"),
                   duration_online_s=data.get("duration_online_s"),
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {"video_id": self.video_id, "url": self.url, "channel": self.channel,
               "duration_online_s": self.duration_online_s}
        out.update(self.extra)
        return out


@dataclass
class JobBundle:
    job_id: str
    source_type: str
    title: str
    artist: str
    audio: str
    album: str | None = None
    video: str | None = None
    cover: str | None = None
    variants: list[str] | None = None
    youtube: YouTubeMetadata | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: the folder the bundle was loaded from (not serialised)
    root: Path | None = field(default=None, compare=False)

    _KNOWN = ("schema_version", "job_id", "source_type", "title", "artist", "album", "audio",
              "video", "cover", "variants", "youtube")

    # ----- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": self.schema_version, "job_id": self.job_id,
                               "source_type": self.source_type, "title": self.title,
                               "artist": self.artist, "album": self.album, "audio": self.audio}
        for key in ("video", "cover", "variants"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.youtube is not None:
            out["youtube"] = self.youtube.to_dict()
        out.update(self.extra)
        return out

    @property
    def source_url(self) -> str | None:
        if self.youtube is not None:
            return self.youtube.url
        url = self.extra.get("source_url")
        return url if isinstance(url, str) else None

    def media_path(self, name: str) -> Path | None:
        rel = getattr(self, name)
        if rel is None:
            return None
        if self.root is None:
            raise BundleError("bundle has no folder")
        return self.root / rel

    # ----- loading / validation ------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, root: Path | None = None) -> "JobBundle":
        """Validate a parsed job.json (schema + semantic checks) and build the bundle."""
        if not isinstance(data, dict):
            raise BundleError("job.json: top level must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"job.json: unknown schema_version {version!r} "
                              f"(this processor reads version {SCHEMA_VERSION})")
        missing = [k for k in ("job_id", "source_type", "title", "artist", "audio") if k not in data]
        if missing:
            raise BundleError(f"job.json: missing required field(s): {', '.join(missing)}")
        for key in ("audio", "video", "cover"):  # clearer messages than the schema's
            if isinstance(data.get(key), str):
                _check_relpath(key, data[key])
        errors = schema_errors("job", data)
        if errors:
            raise BundleError("job.json does not match the schema: " + "; ".join(errors[:5]))
        variants = data.get("variants")
        if variants is not None:
            unknown = [v for v in variants if v not in VARIANTS]
            if unknown:
                raise BundleError(f"job.json: unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
        yt = data.get("youtube")
        bundle = cls(
            job_id=data["job_id"], source_type=data["source_type"], title=data["title"].strip(),
            artist=data["artist"].strip(), audio=data["audio"], album=data.get("album"),
            video=data.get("video"), cover=data.get("cover"), variants=variants,
            youtube=YouTubeMetadata.from_dict(yt) if yt is not None else None,
            schema_version=version,
            extra={k: v for k, v in data.items() if k not in cls._KNOWN}, root=root)
        if not bundle.title or not bundle.artist:
            raise BundleError("job.json: title and artist must not be blank")
        return bundle

    @classmethod
    def load(cls, folder: Path) -> "JobBundle":
        """Read and fully validate ``folder/job.json`` and the files it references."""
        folder = Path(folder)
        expected_id = job_id_from_folder(folder.name.removesuffix(".tmp"))
        if expected_id is None:
            raise BundleError(f"bundle folder {folder.name!r} is not job_<id> with a valid id "
                              f"({JOB_ID_RE.pattern})")
        job_json = folder / "job.json"
        data = read_json_file(job_json)
        bundle = cls.from_dict(data, root=folder)
        if bundle.job_id != expected_id:
            raise BundleError(f"job.json: job_id {bundle.job_id!r} does not match its folder "
                              f"{folder.name!r}")
        bundle.check_files()
        return bundle

    def check_files(self) -> None:
        """Every referenced file exists, is a regular file, and resolves inside the bundle."""
        if self.root is None:
            raise BundleError("bundle has no folder")
        root = self.root.resolve()
        for key in ("audio", "video", "cover"):
            rel = getattr(self, key)
            if rel is None:
                continue
            _check_relpath(key, rel)
            path = self.root / rel
            try:
                real = path.resolve(strict=True)
            except (FileNotFoundError, RuntimeError):
                raise BundleError(f"job.json: {key} file {rel!r} does not exist in the bundle") from None
            if not real.is_relative_to(root):
                raise BundleError(f"job.json: {key} {rel!r} is a link leading outside the bundle")
            if not real.is_file():
                raise BundleError(f"job.json: {key} {rel!r} is not a regular file")
            if real.stat().st_size == 0:
                raise BundleError(f"job.json: {key} file {rel!r} is empty")

    def save(self, folder: Path) -> Path:
        path = Path(folder) / "job.json"
        write_json_atomic(path, self.to_dict())
        return path


def _check_relpath(key: str, rel: str) -> None:
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel) or "\\" in rel:
        raise BundleError(f"job.json: {key} must be a path relative to the bundle, got {rel!r}")
    if any(ord(c) < 32 for c in rel):
        raise BundleError(f"job.json: {key} {rel!r} contains control characters")
    if ".." in Path(rel).parts:
        raise BundleError(f"job.json: {key} {rel!r} must not contain '..'")


def read_json_file(path: Path, *, max_bytes: int = MAX_JOB_JSON_BYTES) -> Any:
    """Parse a JSON file defensively: not a symlink, bounded size, strict JSON."""
    name = path.name
    # O_NONBLOCK: opening a FIFO (or a device) must never block the sensor or the CLI;
    # the fstat below refuses anything that is not a regular file before reading.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BundleError(f"{name} is missing") from None
    except OSError as exc:
        if path.is_symlink():
            raise BundleError(f"{name} must be a regular file, not a symlink") from None
        raise BundleError(f"{name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{name} is not a regular file")
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BundleError(f"{name} is larger than {max_bytes // 1024} KiB")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BundleError(f"{name} is not UTF-8 text") from None
    except RecursionError:
        raise BundleError(f"{name} is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None


_OPTIONAL = ("gain_db", "loudness_lufs", "replaygain_track_gain_db", "replaygain_track_peak")


@dataclass
class ArtifactMetadata:
    kind: str  # audio | video | stems
    variant: str
    label: str
    path: str  # relative to outputs/<job_id>/
    codec: str
    duration_s: float
    sample_rate: int
    channels: int
    size_bytes: int
    sha256: str
    gain_db: float | None = None
    loudness_lufs: float | None = None  # EBU R128 integrated loudness of the file
    replaygain_track_gain_db: float | None = None  # ReplayGain 2.0 (-18 LUFS), also in the tags
    replaygain_track_peak: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL}


@dataclass
class JobManifest:
    job_id: str
    source_type: str
    artist: str
    album: str | None
    title: str
    stems_preserved: bool
    artifacts: list[ArtifactMetadata]
    provenance: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    FILENAME = MANIFEST_FILE

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "job_id": self.job_id,
                "source_type": self.source_type, "artist": self.artist, "album": self.album,
                "title": self.title, "stems_preserved": self.stems_preserved,
                "artifacts": [a.to_dict() for a in self.artifacts],
                "provenance": self.provenance}

    def validate(self) -> None:
        errors = schema_errors("manifest", json.loads(json.dumps(self.to_dict())))
        if errors:
            raise ValueError("manifest does not match its schema: " + "; ".join(errors[:5]))
        if any(isinstance(a.duration_s, float) and math.isnan(a.duration_s) for a in self.artifacts):
            raise ValueError("manifest: NaN duration")

    def save(self, output_dir: Path) -> Path:
        """Validate, then write ``output_dir/manifest.json`` atomically."""
        self.validate()
        path = Path(output_dir) / self.FILENAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, output_dir: Path) -> "JobManifest":
        """The manifest of ``output_dir`` (``read_manifest``); ``BundleError`` when it is
        unreadable or lacks a field this class needs."""
        data = read_manifest(output_dir)
        try:
            return cls(job_id=data["job_id"], source_type=data["source_type"],
                       artist=data["artist"], album=data.get("album"), title=data["title"],
                       stems_preserved=data["stems_preserved"],
                       artifacts=[ArtifactMetadata(**a) for a in data["artifacts"]],
                       provenance=data["provenance"], schema_version=data["schema_version"])
        except KeyError as exc:
            raise BundleError(f"{MANIFEST_FILE}: {exc.args[0]!r} is missing") from None
        except TypeError as exc:
            raise BundleError(f"{MANIFEST_FILE}: an artifact does not match its schema: "
                              f"{exc}") from None


def read_manifest(output_dir: Path) -> dict[str, Any]:
    """``output_dir/manifest.json``, read the way every reader reads it: a regular file (not
    a symlink) of at most 4 MiB of strict UTF-8 JSON holding an object; anything else
    raises ``BundleError`` saying why. It is not checked against the schema here (the
    ``manifest_matches_files`` check does that): readers take what they need with
    ``manifest_section`` and ``.get``."""
    data = read_json_file(Path(output_dir) / MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(data, dict):
        raise BundleError(f"{MANIFEST_FILE} is not a JSON object")
    return data


def manifest_section(manifest: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``manifest[k1][k2]...`` when each is an object, else ``{}``."""
    for key in keys:
        manifest = manifest.get(key) if isinstance(manifest, dict) else None
    return manifest if isinstance(manifest, dict) else {}


def manifest_dirs(outputs_dir: Path, job_ids: Iterable[str] | None = None) -> list[Path]:
    """The job folders ``outputs/<job_id>/`` holding a manifest.json, in job-id order
    (only ``job_ids`` when given; folders whose name is not a job id are not jobs)."""
    wanted = set(job_ids) if job_ids is not None else None
    return [path.parent for path in sorted(Path(outputs_dir).glob(f"*/{MANIFEST_FILE}"))
            if JOB_ID_RE.match(path.parent.name)
            and (wanted is None or path.parent.name in wanted)]


def iter_manifests(outputs_dir: Path, job_ids: Iterable[str] | None = None
                   ) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """``(job_id, folder, manifest)`` of every finished job (``manifest_dirs``); a job whose
    manifest cannot be read (``read_manifest``) is left out: it is not a finished track."""
    for folder in manifest_dirs(outputs_dir, job_ids):
        try:
            yield folder.name, folder, read_manifest(folder)
        except BundleError:
            continue
