"""Folder / library import (``imaker import PATH...``): audio files or whole trees (the old
``/incoming/`` drop folder, an ``Artist/Album/Title.mp3`` library) become bundles in
``QUEUE_OTHER``.

Artist, album, title and cover come from the file's tags (mutagen); what is missing comes
from the path: ``Artist/Album/Title.ext`` (inside the imported folder, or the file's own
parent folders when a single file is imported), ``Artist - Title.ext``, and a cover image
beside the file (``cover.jpg``, ``folder.jpg``, ``front.jpg``, ``.png``). Leading track
numbers (``01 - ``, ``01. ``) are dropped from titles. The same file content is not queued
twice (key ``local:sha256:<hash>``) unless forced; the files are copied (``--move`` moves
them, the old drop-folder behaviour).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ..audio import AudioError, probe, read_tags
from ..fsutil import sha256_file
from .base import (FAILED, REJECTED, Outcome, Rejected, Retriever, RetrieverError,
                   describe, make_job_id)
from .media import AUDIO_EXTENSIONS

COVER_NAMES = ("cover", "folder", "front", "album", "albumart")
_TRACKNO = re.compile(r"^\s*(?:disc\s*\d+\s*[-.]\s*)?\d{1,3}\s*(?:[-.)_]\s*|\s+)(?=\S)", re.I)


def audio_files(target: Path) -> tuple[Path, list[Path]]:
    """(root the path facts are taken relative to, audio files under ``target``)."""
    target = Path(target)
    if target.is_file():
        return target.parent, [target]
    if target.is_dir():
        files = sorted(p for p in target.rglob("*")
                       if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(target).parts))
        return target, files
    raise RetrieverError(f"{target}: no such file or folder")


def facts_from_path(path: Path, root: Path, single: bool) -> dict[str, str | None]:
    """Artist/album/title guessed from ``Artist/Album/Title.ext`` or ``Artist - Title.ext``."""
    stem = path.stem.strip()
    if single:
        parents = [p for p in path.parts[:-1] if p not in ("/", "")][-2:]
    else:
        parents = list(path.relative_to(root).parts[:-1])[-2:]
    artist = album = None
    title = _TRACKNO.sub("", stem) or stem
    left, sep, right = title.partition(" - ")
    if sep and left.strip() and right.strip():
        # "Artist - Title.ext" names the artist itself; the folder is its album only in an
        # Artist/Album/ layout that agrees
        artist, title = left.strip(), right.strip()
        if len(parents) == 2 and parents[0].lower() == artist.lower():
            album = parents[1]
    elif len(parents) == 2:
        artist, album = parents
    return {"artist": artist, "album": album, "title": title}


def sibling_cover(path: Path) -> Path | None:
    try:
        entries = {p.name.lower(): p for p in path.parent.iterdir() if p.is_file()}
    except OSError:
        return None
    for name in COVER_NAMES:
        for ext in (".jpg", ".jpeg", ".png"):
            if name + ext in entries:
                return entries[name + ext]
    return None


class ImportRetriever(Retriever):
    name = "import"
    description = "Audio files or folders (tags, else Artist/Album/Title paths) -> QUEUE_OTHER"
    source_type = "local"

    def __init__(self, ctx, move: bool = False):
        super().__init__(ctx)
        self.move = bool(move)

    def retrieve_one(self, target: str) -> Iterator[Outcome]:
        root, files = audio_files(Path(target).expanduser())
        if not files:
            raise RetrieverError(f"{target}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
        single = Path(target).is_file()
        for path in files:
            try:
                yield self.import_file(path, root, single)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the tree
                yield Outcome(str(path), REJECTED if isinstance(exc, Rejected) else FAILED,
                              message=describe(exc))

    def import_file(self, path: Path, root: Path, single: bool) -> Outcome:
        label = str(path)
        digest = sha256_file(path)
        key = f"local:sha256:{digest}"
        if (dup := self.duplicate(label, key, "this file was ")) is not None:
            return dup
        try:
            info = probe(path)
        except AudioError as exc:
            raise Rejected(str(exc)) from None
        if info["audio"] is None:
            raise Rejected(f"{path.name} has no audio stream")
        job = import_job(path, root, single, digest)
        files = {job["audio"]: path}
        tags = read_tags(path)
        with self.staging_dir() as staging:
            if tags.cover is not None:
                cover = staging / f"cover{tags.cover_ext}"
                cover.write_bytes(tags.cover)
            else:
                cover = sibling_cover(path)
            if cover is not None:
                job["cover"] = "cover" + (".png" if cover.suffix.lower() == ".png" else ".jpg")
                files[job["cover"]] = cover
            # the cover beside the file is shared by its album: always copied
            moved = {job["audio"]} if self.move else set()
            return self.write(queue="other", job=job, files=files, source_key=key,
                              target=label, move=moved)


def import_job(path: Path, root: Path, single: bool, digest: str | None = None) -> dict:
    """The job.json fields of one imported file (tags first, then the path)."""
    digest = digest or sha256_file(path)
    tags = read_tags(path)
    guess = facts_from_path(path, root, single)
    artist = tags.artist or guess["artist"] or "Unknown Artist"
    title = tags.title or guess["title"] or path.stem or "Untitled"
    album = tags.album or guess["album"]
    job_id = make_job_id("local", f"{artist} - {title}"[:80], digest[:10])
    return {
        "schema_version": 1, "job_id": job_id, "source_type": "local",
        "title": title[:512], "artist": artist[:512], "album": album[:512] if album else None,
        "audio": "audio" + path.suffix.lower(),
        "source_path": str(path.resolve()),
        "local": {"sha256": digest, "tags": {"artist": tags.artist, "album": tags.album,
                                             "title": tags.title},
                  "from_path": guess},
    }
