"""YouTube (and every other site yt-dlp supports) through yt-dlp's Python API.

Modes (``YTDL_MODE`` or ``--mode``):

* ``audio`` — best audio, converted to ``YTDL_AUDIO_FORMAT`` (m4a): one bundle
  ``yt_<id>`` in ``QUEUE_YOUTUBE_AUDIO``.
* ``video`` — best video+audio merged to mp4: one bundle ``yt_<id>_video`` in
  ``QUEUE_YOUTUBE_VIDEO`` holding ``video.mp4`` and its audio track as ``audio.m4a``.
* ``both`` — one download, both bundles.

Playlists and channels become one bundle per entry. Before a bundle is written the
downloaded file's duration (ffprobe) must match the one the site reports within
``max(YTDL_DURATION_TOL_SEC, YTDL_DURATION_TOL_PCT * online)``; a mismatch rejects the
entry and writes nothing. When the site reports no duration (e.g. a direct media URL)
the bundle says so (``youtube.duration_online_s: null``, ``duration_verified: false``).
The audio is tagged Artist = channel, Album = ``YTDL``, Title = video title, with the
thumbnail as cover (also kept as ``cover.jpg``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..audio import AudioError, cover_mime, probe
from .base import (DUPLICATE, FAILED, REJECTED, SKIPPED, Outcome, Rejected, Retriever,
                   RetrieverError, describe, make_job_id)
from .media import extract_audio, write_tags

MODES = ("audio", "video", "both")
ALBUM = "YTDL"
_PLAYLIST_TYPES = ("playlist", "multi_video")


def _clean_url(url: str) -> str:
    from yt_dlp.utils import unsmuggle_url

    return unsmuggle_url(url)[0] if url else url


def upload_date_iso(value: str | None) -> str | None:
    """yt-dlp's ``YYYYMMDD`` -> ``YYYY-MM-DD``."""
    if isinstance(value, str) and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return None


def duration_tolerance(online: float, tol_sec: float, tol_pct: float) -> float:
    return max(tol_sec, tol_pct * online)


def check_duration(online: float | None, measured: float | None, tol_sec: float,
                   tol_pct: float) -> dict[str, Any]:
    """The ``youtube`` block's duration facts; raises Rejected on a mismatch."""
    if measured is None:
        raise Rejected("cannot measure the duration of the downloaded file")
    if not online:
        return {"duration_online_s": None, "duration_measured_s": round(measured, 3),
                "duration_verified": False,
                "duration_check": "skipped: the extractor reported no duration"}
    tol = duration_tolerance(online, tol_sec, tol_pct)
    if abs(measured - online) > tol:
        raise Rejected(f"duration mismatch: the download lasts {measured:.2f} s but the site "
                       f"says {online:.2f} s (tolerance {tol:.2f} s); no bundle written")
    return {"duration_online_s": float(online), "duration_measured_s": round(measured, 3),
            "duration_verified": True,
            "duration_check": f"ok: within {tol:.2f} s"}


def source_identity(info: dict) -> tuple[str, str] | None:
    """(source key, job id stem) of an extracted entry, or None when it has no id yet.

    YouTube: ``youtube:<id>`` / ``yt_<id>``. Other extractors: ``<ie>:<id>`` /
    ``yt_<ie>_<id>``. The generic extractor's ids are file names (not unique across
    hosts), so its key is the media URL and its job id carries a hash of it."""
    vid = info.get("id")
    ie = (info.get("extractor_key") or info.get("ie_key") or "").lower()
    if not vid or not ie:
        return None
    if ie == "youtube":
        return f"youtube:{vid}", make_job_id("yt", vid)
    if ie == "generic":
        url = _clean_url(info.get("webpage_url") or info.get("original_url") or info.get("url") or "")
        digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:8]
        return f"generic:{url}", make_job_id("yt", "generic", str(vid)[:40], digest)
    return f"{ie}:{vid}", make_job_id("yt", ie, str(vid))


class YouTubeRetriever(Retriever):
    name = "youtube"
    description = ("YouTube and other yt-dlp sites (URLs, playlists, channels) -> "
                   "QUEUE_YOUTUBE_AUDIO / QUEUE_YOUTUBE_VIDEO")
    source_type = "youtube"

    def __init__(self, ctx, mode: str | None = None, audio_format: str | None = None,
                 ydl_opts: dict | None = None):
        super().__init__(ctx)
        s = ctx.settings
        self.mode = (mode or s.retrievers.ytdl_mode).lower()
        if self.mode not in MODES:
            raise RetrieverError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        self.audio_format = (audio_format or s.retrievers.ytdl_audio_format).lower()
        self.tol_sec, self.tol_pct = s.retrievers.ytdl_duration_tol_sec, s.retrievers.ytdl_duration_tol_pct
        self.extra_opts = dict(ydl_opts or {})

    @property
    def kinds(self) -> list[str]:
        return ["audio", "video"] if self.mode == "both" else [self.mode]

    # ----- yt-dlp ---------------------------------------------------------------------
    def ydl_options(self, staging: Path) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "quiet": True, "no_warnings": True, "noprogress": True, "noplaylist": False,
            "outtmpl": str(staging / "%(id).80B.%(ext)s"),
            "restrictfilenames": True, "writethumbnail": True, "socket_timeout": 30,
            "retries": 3, "overwrites": True, "color": "never", "logger": _Logger(self.ctx.log),
        }
        pps: list[dict] = [{"key": "FFmpegThumbnailsConvertor", "format": "jpg",
                            "when": "before_dl"}]
        if self.mode == "audio":
            opts["format"] = "bestaudio/best"
            pps.append({"key": "FFmpegExtractAudio", "preferredcodec": self.audio_format})
        else:
            opts["format"] = "bv*[ext=mp4]+ba[ext=m4a]/bv*+ba/b"
            opts["merge_output_format"] = "mp4"
        opts["postprocessors"] = pps
        opts.update(self.extra_opts)
        return opts

    def retrieve_one(self, target: str) -> Iterator[Outcome]:
        import yt_dlp

        with self.staging_dir() as staging, yt_dlp.YoutubeDL(self.ydl_options(staging)) as ydl:
            try:
                raw = ydl.extract_info(target, download=False, process=False)
            except yt_dlp.utils.DownloadError as exc:
                raise RetrieverError(_ytdl_message(exc)) from None
            if raw is None:
                raise RetrieverError("yt-dlp found nothing to download")
            for entry in self._entries(raw):
                yield from self._one_entry(ydl, target, entry, staging)

    def _entries(self, info: dict) -> Iterable[dict]:
        if info.get("_type") in _PLAYLIST_TYPES:
            for entry in info.get("entries") or []:
                if entry is None:
                    continue
                yield from self._entries(entry)
        else:
            yield info

    def _one_entry(self, ydl, target: str, entry: dict, staging: Path) -> Iterator[Outcome]:
        label = _entry_label(target, entry)
        ident = source_identity(entry)
        if ident is not None:
            dupes = [self._seen(ident, kind) for kind in self.kinds]
            if all(dupes):
                for kind, seen in zip(self.kinds, dupes):
                    yield Outcome(label, DUPLICATE, job_id=seen["job_id"], queue=seen["queue"],
                                  message=f"{ident[0]} was queued as {seen['job_id']} at "
                                          f"{seen['at']} (use --force to queue it again)")
                return
        try:
            info = ydl.process_ie_result(dict(entry), download=True)
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the playlist
            import yt_dlp

            msg = _ytdl_message(exc) if isinstance(exc, yt_dlp.utils.DownloadError) else describe(exc)
            yield Outcome(label, FAILED, message=msg)
            return
        try:
            yield from self._bundles(label, info, staging)
        except Exception as exc:  # noqa: BLE001
            yield Outcome(label, REJECTED if isinstance(exc, Rejected) else FAILED,
                          message=describe(exc))
        finally:
            for path in list(staging.iterdir()):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def _seen(self, ident: tuple[str, str], kind: str) -> dict | None:
        return self.is_seen(f"{ident[0]}#{kind}")

    def _bundles(self, label: str, info: dict, staging: Path) -> Iterator[Outcome]:
        downloads = info.get("requested_downloads") or []
        media = Path(downloads[0]["filepath"]) if downloads and downloads[0].get("filepath") else None
        if media is None or not media.is_file():
            raise RetrieverError("yt-dlp reported no downloaded file")
        ident = source_identity(info)
        if ident is None:
            raise RetrieverError("yt-dlp gave the entry no id")
        source_key, job_stem = ident
        probed = probe(media)
        if probed["audio"] is None:
            raise Rejected(f"the download ({media.name}) has no audio stream")
        facts = check_duration(info.get("duration"), probed["duration_s"], self.tol_sec,
                               self.tol_pct)
        title = (info.get("title") or info.get("id") or "Untitled").strip()[:512]
        channel = (info.get("channel") or info.get("uploader") or info.get("creator")
                   or info.get("webpage_url_domain") or info.get("extractor") or "Unknown channel")
        channel = str(channel).strip()[:512]
        cover = _thumbnail(info)
        youtube = {
            "video_id": str(info["id"])[:64],
            "url": _clean_url(info.get("webpage_url") or info.get("original_url") or label)[:2048],
            "channel": channel,
            "channel_id": info.get("channel_id") or info.get("uploader_id"),
            **facts,
            "upload_date": upload_date_iso(info.get("upload_date")),
            "extractor": info.get("extractor_key"),
        }
        base_job = {"title": title, "artist": channel, "album": ALBUM,
                    "source_url": youtube["url"], "youtube": youtube}
        has_video = probed["video"] is not None
        for kind in self.kinds:
            key = f"{source_key}#{kind}"
            job_id = job_stem if kind == "audio" else make_job_id(job_stem, "video")
            if kind == "video" and not has_video:
                # --mode both on an audio-only source: the audio bundle is the useful part
                yield Outcome(label, SKIPPED if self.mode == "both" else REJECTED, job_id=job_id,
                              message="no video bundle: the download has no video stream")
                continue
            files: dict[str, Path] = {}
            job = dict(base_job, job_id=job_id,
                       retriever={"name": self.name, "mode": self.mode, "kind": kind,
                                  "yt_dlp": _ytdlp_version()})
            if self.mode == "audio":
                audio = media
            else:
                fmt = self.audio_format if self.audio_format in ("m4a", "mp3", "flac") else "m4a"
                audio = extract_audio(media, staging / f"{job_id}.audio.{fmt}", fmt)
            tagged = write_tags(audio, artist=channel, title=title, album=ALBUM, cover=cover)
            job["audio"] = "audio" + audio.suffix.lower()
            files[job["audio"]] = audio
            job["retriever"]["tagged"] = tagged
            if kind == "video":
                write_tags(media, artist=channel, title=title, album=ALBUM, cover=cover)
                job["video"] = "video" + media.suffix.lower()
                files[job["video"]] = media  # moved: the video job is the last use of it
            if cover is not None:
                job["cover"] = "cover" + cover.suffix.lower()
                copy = staging / f"{job_id}.{job['cover']}"
                shutil.copyfile(cover, copy)
                files[job["cover"]] = copy
            queue = "youtube_audio" if kind == "audio" else "youtube_video"
            yield self.write(queue=queue, job=job, files=files, source_key=key, target=label,
                             move=True)


class _Logger:
    """yt-dlp's messages: errors are reported per URL by the retriever, warnings go to the
    context's log, chatter is dropped."""

    def __init__(self, log):
        self.log = log

    def debug(self, msg: str) -> None:
        pass

    info = debug

    def warning(self, msg: str) -> None:
        self.log(f"yt-dlp: {msg}")

    def error(self, msg: str) -> None:
        pass


def _thumbnail(info: dict) -> Path | None:
    for thumb in reversed(info.get("thumbnails") or []):
        path = thumb.get("filepath")
        if path and Path(path).is_file():
            head = Path(path).read_bytes()[:16]
            if cover_mime(head):
                return Path(path)
    return None


def _entry_label(target: str, entry: dict) -> str:
    url = entry.get("webpage_url") or entry.get("url")
    if url and _clean_url(url) != target:
        return f"{target} [{_clean_url(url)}]"
    return target


def _ytdl_message(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text.removeprefix("ERROR: ") or type(exc).__name__


def _ytdlp_version() -> str:
    try:
        from yt_dlp.version import __version__
        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"


__all__ = ["YouTubeRetriever", "check_duration", "source_identity", "MODES", "AudioError"]
