"""Deezer through the deemix library (optional: ``pip install 'instrumental-maker[deezer]'``).

``imaker retrieve deezer URL...`` with ``DEEZER_ARL`` set (the ``arl`` cookie of a logged-in
deezer.com session). Tracks, albums and playlists become one bundle per track in
``QUEUE_OTHER``. deemix downloads and tags the files (artist, album, title, track number,
ISRC, cover); the bundle takes its metadata from those tags (:func:`deezer_job`) and keeps
the embedded cover as ``cover.jpg``. A track is not queued twice (key ``deezer:<track id>``)
unless forced.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any, Iterator

from ..audio import FileTags, probe, read_tags
from .base import (FAILED, REJECTED, Outcome, Rejected, Retriever, RetrieverError,
                   describe, make_job_id)

BITRATES = {"flac": 9, "mp3_320": 3, "mp3_128": 1}
INSTALL_HINT = ("deemix is not installed; install the optional extra: "
                "pip install 'instrumental-maker[deezer]' (or pip install deemix==3.6.6)")


def deezer_job(track: dict[str, Any], tags: FileTags | None = None, *,
               audio_name: str = "audio.mp3", cover_name: str | None = None) -> dict[str, Any]:
    """job.json fields for one downloaded Deezer track.

    ``track`` is deemix's per-file record (``{"id", "title", "artist", "album"?, ...}`` —
    ``downloadObject.files[i]["data"]``) or a Deezer API track object (``artist`` /
    ``album`` as objects); ``tags`` are the tags deemix wrote into the file, preferred
    when present."""
    tags = tags or FileTags()
    track_id = str(track.get("id") or track.get("SNG_ID") or "").strip()
    if not track_id or track_id == "0":
        raise RetrieverError("the Deezer track has no id")

    def name(value) -> str | None:
        if isinstance(value, dict):
            value = value.get("name") or value.get("title")
        return str(value).strip() if value else None

    artist = tags.artist or name(track.get("artist")) or "Unknown Artist"
    title = tags.title or name(track.get("title")) or f"Deezer track {track_id}"
    album = tags.album or name(track.get("album"))
    job = {
        "schema_version": 1,
        "job_id": make_job_id("dz", track_id),
        "source_type": "deezer",
        "title": title[:512], "artist": artist[:512], "album": album[:512] if album else None,
        "audio": audio_name,
        "source_url": track.get("link") or f"https://www.deezer.com/track/{track_id}",
        "deezer": {"track_id": track_id,
                   "isrc": track.get("isrc"),
                   "duration_online_s": track.get("duration"),
                   "album_id": str(track["album"]["id"]) if isinstance(track.get("album"), dict)
                   and track["album"].get("id") else None},
    }
    if cover_name:
        job["cover"] = cover_name
    return job


def _deemix():
    try:
        from deemix import generateDownloadObject
        from deemix.downloader import Downloader
        from deemix.itemgen import GenerationError
        from deemix.settings import DEFAULTS
        from deezer import Deezer
    except ImportError:
        raise RetrieverError(INSTALL_HINT) from None
    return Deezer, generateDownloadObject, Downloader, GenerationError, DEFAULTS


class _Listener:
    def __init__(self, log):
        self.log = log

    def send(self, key, value=None):
        if key in ("downloadWarn", "queueError"):
            self.log(f"deemix: {key}: {value}")


class DeezerRetriever(Retriever):
    name = "deezer"
    description = "Deezer tracks, albums, playlists via deemix (DEEZER_ARL) -> QUEUE_OTHER"
    source_type = "deezer"

    def __init__(self, ctx, arl: str | None = None, bitrate: str = "mp3_320"):
        super().__init__(ctx)
        self.arl = arl
        if bitrate not in BITRATES:
            raise RetrieverError(f"bitrate {bitrate!r}: one of {', '.join(BITRATES)}")
        self.bitrate = bitrate
        self._dz = None

    def _login(self):
        Deezer, *_ = _deemix()
        if self._dz is None:
            secret = self.ctx.settings.retrievers.deezer_arl
            arl = (self.arl or (secret.get_secret_value() if secret else "")).strip()
            if not arl:
                raise RetrieverError("set DEEZER_ARL to the arl cookie of a logged-in "
                                     "deezer.com session")
            dz = Deezer()
            if not dz.login_via_arl(arl):
                raise RetrieverError("Deezer refused DEEZER_ARL (expired or wrong cookie)")
            self._dz = dz
        return self._dz

    def retrieve_one(self, target: str) -> Iterator[Outcome]:
        _, generate, Downloader, GenerationError, DEFAULTS = _deemix()
        dz = self._login()
        listener = _Listener(self.ctx.log)
        with self.staging_dir() as staging:
            settings = deepcopy(DEFAULTS)
            settings.update({"downloadLocation": str(staging), "createPlaylistFolder": False,
                             "createAlbumFolder": False, "createCDFolder": False,
                             "createArtistFolder": False, "createSingleFolder": False,
                             "saveArtwork": False, "overwriteFile": "y",
                             "tracknameTemplate": "%track_id%",
                             "albumTracknameTemplate": "%track_id%",
                             "playlistTracknameTemplate": "%track_id%",
                             "maxBitrate": str(BITRATES[self.bitrate])})
            settings["tags"] = dict(settings["tags"], cover=True)
            try:
                objs = generate(dz, target, BITRATES[self.bitrate], {}, listener)
            except GenerationError as exc:
                raise RetrieverError(f"{exc.link}: {exc.message}") from None
            for obj in objs if isinstance(objs, list) else [objs]:
                Downloader(dz, obj, settings, listener).start()
                for rec in obj.files:
                    try:
                        yield self._bundle(target, rec)
                    except Exception as exc:  # noqa: BLE001
                        yield Outcome(target, REJECTED if isinstance(exc, Rejected) else FAILED,
                                      message=describe(exc))
                for err in obj.errors:
                    data = err.get("data") or {}
                    yield Outcome(f"{target} [{data.get('artist', '?')} - {data.get('title', '?')}]",
                                  FAILED, message=str(err.get("message") or err))

    def _bundle(self, target: str, rec: dict) -> Outcome:
        path = Path(rec.get("path") or "")
        data = rec.get("data") or {}
        label = f"{target} [{data.get('artist', '?')} - {data.get('title', '?')}]"
        key = f"deezer:{data.get('id')}"
        if (dup := self.duplicate(label, key)) is not None:
            return dup
        if not path.is_file():
            raise RetrieverError("deemix reported no downloaded file")
        if probe(path)["audio"] is None:
            raise Rejected(f"{path.name} has no audio stream")
        tags = read_tags(path)
        files = {f"audio{path.suffix.lower()}": path}
        cover_name = None
        if tags.cover:
            cover_name = f"cover{tags.cover_ext}"
            cover = path.with_name(f"{path.stem}.{cover_name}")
            cover.write_bytes(tags.cover)
            files[cover_name] = cover
        job = deezer_job(data, tags, audio_name=f"audio{path.suffix.lower()}",
                         cover_name=cover_name)
        return self.write(queue="other", job=job, files=files, source_key=key, target=label)
