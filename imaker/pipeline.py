"""The per-track processing stages, as plain functions over folders (no Dagster).

Each stage reads what the previous one stored, so any stage can be re-run on its own
(a variant backfill reads the stored stems and never re-separates)::

    library/<job_id>/  job.json, cover.*, source.flac, source.json, variants.json
    stems/<job_id>/    <model>/<stem>.flac (24-bit, scaled by its model.json's "scale") per
                       model, stems.json (the set: ``imaker.stemset``)
    outputs/<job_id>/  manifest.json, files/audio/*.m4a, files/stems/*.flac (PRESERVE_STEMS)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import audio as audio_mod
from . import stemset
from .analysis import SILENCE_FLOOR_DBFS
from .bundle import ArtifactMetadata, BundleError, JobBundle, JobManifest
from .fsutil import atomic_path, copy_hashing, safe_filename, sha256_file, write_json_atomic
from .queues import QueueStore, utcnow
from .settings import Output, Settings
from .stemstore import STEM_FORMAT, RawStemWriter
from .variants import VARIANTS, selected_variants, stream_mix
from .video import mux_video

SOURCE_RATE = 44100
SOURCE_CHANNELS = 2
#: waveform pictures kept in the track library (drawn by the ffmpeg that encodes the file)
SOURCE_WAVEFORM = "source.png"
SOURCE_WAVEFORM_COLOR = "0x2f6fdf"
VARIANT_WAVEFORM = "{variant}.png"  # the instrumental's
VARIANT_WAVEFORM_COLOR = "0xe0602f"
#: what ``write_manifest`` recorded of every file it listed (sha256, size, mtime), in the
#: track library: ``manifest_matches_files`` trusts a file whose size and mtime are unchanged
MANIFEST_FILES = "manifest_files.json"


class StageError(RuntimeError):
    """A stage failed for a reason a person can act on."""


class TransientError(RuntimeError):
    """A failure that another attempt may not meet (the separation service went away):
    the bundle stays claimed and the orchestrator retries the step."""


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (BundleError, StageError, audio_mod.AudioError)):
        return text
    return f"{type(exc).__name__}: {text}"


@contextmanager
def failing_to_archive(store: QueueStore, job_id: str, drop_id: str | None,
                       stage: str) -> Iterator[None]:
    """An exception inside moves this drop of the job from working/ to ``failed/`` with
    ``error.json`` naming the stage, then propagates. Not for ``TransientError`` (retried)
    nor for an interrupted run (BaseException): a run that dies is failed or retried by
    the orchestrator, and the bundle's claim follows its runs' final status."""
    try:
        yield
    except TransientError:
        raise
    except Exception as exc:
        if drop_id:
            store.fail(job_id, drop_id, stage, describe_error(exc))
        raise


@dataclass(frozen=True)
class Library:
    library_dir: Path
    stems_dir: Path
    outputs_dir: Path

    @classmethod
    def from_settings(cls, s: Settings) -> "Library":
        return cls(s.paths.library_dir, s.paths.stems_dir, s.paths.outputs_dir)

    def track_dir(self, job_id: str) -> Path:
        return self.library_dir / job_id

    def stem_dir(self, job_id: str) -> Path:
        return self.stems_dir / job_id

    def output_dir(self, job_id: str) -> Path:
        return self.outputs_dir / job_id

    def bundle(self, job_id: str) -> JobBundle:
        """The validated bundle as stored by the source stage (media paths refer to the
        library copy: only the cover is kept there)."""
        path = self.track_dir(job_id) / "job.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StageError(f"track {job_id} has no stored source: materialize source_audio "
                             "first") from None
        return JobBundle.from_dict(data, root=self.track_dir(job_id))

    def read_json(self, job_id: str, name: str, *, stems: bool = False) -> dict:
        folder = self.stem_dir(job_id) if stems else self.track_dir(job_id)
        path = folder / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StageError(f"track {job_id}: {path} is missing (upstream asset not "
                             "materialized)") from None

    def has_stems(self, job_id: str) -> bool:
        return (self.stem_dir(job_id) / "stems.json").is_file()

    def forget(self, job_id: str, *, outputs: bool = False) -> None:
        shutil.rmtree(self.track_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.stem_dir(job_id), ignore_errors=True)
        if outputs:
            shutil.rmtree(self.output_dir(job_id), ignore_errors=True)


def track_basename(artist: str, title: str) -> str:
    """``Artist - Track``, safe as one file name (``AC/DC`` -> ``AC_DC``)."""
    return safe_filename(f"{safe_filename(artist, 90)} - {safe_filename(title, 120)}", 200)


# ----- stage 1: source audio -------------------------------------------------------------
def bundle_folder(store: QueueStore, job_id: str, drop_id: str | None) -> Path:
    """Where a run reads the bundle: its drop in working/ (claimed by whoever started the
    run) or in failed/ (a failed run re-executed from the UI: when it succeeds the manifest
    step moves the bundle to done/), or, for a run without a drop (a re-materialization
    from the UI or a backfill), the copy archived in done/."""
    if drop_id:
        path = store.claimed_path(job_id, drop_id)
        if path is not None:
            return path
        where = store.settled(job_id, drop_id)
        if where is not None and where[0] == "failed":
            return where[1]  # re-executed from the UI after it failed: read it there
        raise StageError(f"drop {drop_id} of job {job_id} is not claimed in working/"
                         + (f" (it is in {where[0]}/ already)" if where else ""))
    found = store.locate(job_id)
    if found is None or found[0] != "done":
        raise StageError(f"job {job_id}: no processed bundle in {store.done_dir} to read the "
                         "source from (drop the bundle into a queue to process it)")
    return found[1]


def prepare_source(store: QueueStore, lib: Library, job_id: str, drop_id: str | None, *,
                   tolerance: tuple[float, float] = (2.0, 0.01)) -> dict:
    """Validate the bundle (this drop's claim in working/, see ``bundle_folder``), keep
    job.json + cover in the library, decode the audio to FLAC at the model rate and check
    its duration against the online one, within ``tolerance`` = (seconds, fraction),
    whichever is larger."""
    folder = bundle_folder(store, job_id, drop_id)
    state = folder.parent.name if drop_id else "done"
    with failing_to_archive(store, job_id, drop_id, "source_audio"):
        bundle = JobBundle.load(folder)
        src = bundle.media_path("audio")
        info = audio_mod.probe(src)
        if info["audio"] is None:
            raise StageError(f"{bundle.audio}: no audio stream")
        # decoded into an unnamed file on the data disk, mapped (``audio.decode``): a long
        # input is not held in this process's memory; every pass below is chunked
        lib.library_dir.mkdir(parents=True, exist_ok=True)
        wav = audio_mod.decode(src, SOURCE_RATE, SOURCE_CHANNELS, scratch=lib.library_dir)
        duration = wav.shape[1] / SOURCE_RATE
        if duration < 0.5:
            raise StageError(f"{bundle.audio}: only {duration:.2f} s of audio")
        peak, rms = audio_mod.peak_rms(wav)
        rms_dbfs = audio_mod.dbfs(rms)
        if rms_dbfs <= SILENCE_FLOOR_DBFS:  # nothing to separate: say so before the model runs
            raise StageError(f"the source is silent: {bundle.audio} has an RMS level of "
                             f"{rms_dbfs} dBFS (at or below {SILENCE_FLOOR_DBFS:g} dBFS)")
        online = bundle.youtube.duration_online_s if bundle.youtube else None
        if online:
            tol = max(tolerance[0], tolerance[1] * online)
            if abs(duration - online) > tol:
                raise StageError(f"duration mismatch: the file lasts {duration:.2f} s but the "
                                 f"source says {online:.2f} s (tolerance {tol:.2f} s)")
        track = lib.track_dir(job_id)
        track.mkdir(parents=True, exist_ok=True)
        stored = JobBundle.from_dict(bundle.to_dict())
        stored.audio = "source.flac"
        stored.video = None
        stored.cover = None
        if bundle.video:  # kept for the video artifact (muxed with the instrumental later)
            video_name = "source_video" + (Path(bundle.video).suffix.lower()[:6] or ".mp4")
            with atomic_path(track / video_name) as tmp:
                shutil.copyfile(bundle.media_path("video"), tmp)
            stored.video = video_name
        if bundle.cover:
            cover_src = bundle.media_path("cover")
            cover_name = "cover" + (Path(bundle.cover).suffix.lower()[:6] or ".img")
            with atomic_path(track / cover_name) as tmp:
                shutil.copyfile(cover_src, tmp)
            stored.cover = cover_name
        # 24-bit FLAC holds [-1, 1): a decode that goes over full scale (loud AAC/MP3
        # masters, float WAVs) is stored scaled down by one constant, like the stems, and
        # every reader divides it back (``read_source``) — nothing is clipped before the
        # variants' own anti-clipping gain.
        ceiling = audio_mod.FLAC24_CEILING
        scale = 1.0 if peak < ceiling else float(ceiling / peak)
        if scale != 1.0:
            wav *= np.float32(scale)
        # measured and drawn by the ffmpeg that encodes it (its loudness and waveform for
        # the UI): source.flac is never decoded again for them
        enc = audio_mod.encode(wav, SOURCE_RATE, track / "source.flac", STEM_FORMAT,
                               measure=True, waveform=SOURCE_WAVEFORM_COLOR)
        with atomic_path(track / SOURCE_WAVEFORM) as tmp:
            tmp.write_bytes(enc.waveform)
        loud = enc.loudness
        meta = {
            "job_id": job_id,
            "duration_s": round(duration, 4),
            "sample_rate": SOURCE_RATE,
            "channels": SOURCE_CHANNELS,
            "input_codec": info["audio"]["codec"],
            "input_sample_rate": info["audio"]["sample_rate"],
            "input_channels": info["audio"]["channels"],
            "input_sha256": sha256_file(src),
            "input_peak": round(peak, 6),
            "input_peak_dbfs": round(float(20 * np.log10(peak)), 2) if peak > 0 else None,
            "input_rms_dbfs": rms_dbfs,
            # of source.flac as written (scaled like it), measured while it was encoded
            "loudness_lufs": _finite(loud["integrated_lufs"]),
            "peak_dbfs": _finite(audio_mod.dbfs(enc.peak)),  # sample peak, as written
            "waveform": SOURCE_WAVEFORM,
            "source_tags": audio_mod.read_tags(src).copied,
            "scale": scale,
            "input_file": bundle.audio,
            "source_type": bundle.source_type,
            "source_url": bundle.source_url,
            "duration_online_s": online,
            "bundle_state": state,
            "original_bundle": bundle.to_dict(),
            "at": utcnow(),
        }
        stored.save(track)
        write_json_atomic(track / "source.json", meta)
    return meta


def read_source(source: Path, samplerate: int = SOURCE_RATE,
                channels: int = SOURCE_CHANNELS, scratch: Path | None = None) -> np.ndarray:
    """The decoded input exactly as ``prepare_source`` got it: ``source.flac`` divided by the
    scale in the ``source.json`` beside it (1.0 unless the input went over full scale).
    ``scratch``: ``audio.decode``'s (a folder to map it from, instead of memory)."""
    wav = audio_mod.decode(source, samplerate, channels, scratch=scratch, stored=True)
    try:
        scale = float(json.loads((Path(source).parent / "source.json").read_text())
                      .get("scale", 1.0))
    except (OSError, ValueError, TypeError):
        scale = 1.0
    if scale and scale != 1.0:
        wav /= np.float32(scale)
    return wav


# ----- stage 2: stems -------------------------------------------------------------------
def _source_sha256(source: Path) -> str | None:
    """The input's sha256 from the ``source.json`` beside ``source`` (what the stored
    stems were separated from), or None."""
    try:
        meta = json.loads((Path(source).parent / "source.json").read_text())
        return f"{meta['input_sha256']}:{meta.get('scale', 1.0)}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stored_record(folder: Path, name: str) -> dict | None:
    try:
        rec = json.loads((folder / name / stemset.MODEL_FILE).read_text())
    except (OSError, ValueError):
        return None
    files = [folder / name / f"{s}.{STEM_FORMAT}" for s in rec.get("sources", [])]
    return rec if files and all(f.is_file() for f in files) else None


def _separate_model(source: Path, folder: Path, name: str, loaded, key: dict, separator,
                    progress: Callable[[float], None] | None) -> dict:
    """One model's stems into ``folder/<name>/`` (built in a hidden folder, renamed into
    place complete with its ``model.json``)."""
    # mapped from an unnamed file in the stems folder, not held in the service's memory
    wav = read_source(source, loaded.samplerate, loaded.channels, scratch=folder)
    frames = wav.shape[1]
    part = folder / f".{name}.part"
    shutil.rmtree(part, ignore_errors=True)
    # The stems stream out of the model into raw files (the whole-track stems are never in
    # memory), then are encoded to FLAC with one scale for all: 24-bit FLAC holds [-1, 1).
    writer = RawStemWriter(part, loaded.sources)

    def sink(start: int, chunk) -> None:
        writer(start, chunk)
        if progress is not None:
            progress(min(1.0, (start + chunk.shape[-1]) / max(frames, 1)))

    try:
        start = time.perf_counter()
        separator.separate(loaded, wav, sink=sink, inplace=True)
        seconds = time.perf_counter() - start
        del wav
        if writer.frames != frames:
            raise StageError(f"{name}: the separation returned {writer.frames} samples for "
                             f"{frames}")
        scale = writer.encode_all(loaded.samplerate)
        record = {**separator.describe(loaded), "folder": name, "key": key,
                  "sources": list(loaded.sources), "scale": scale,
                  "sample_rate": loaded.samplerate, "channels": loaded.channels,
                  "frames": frames, "separation_seconds": round(seconds, 3), "at": utcnow()}
        write_json_atomic(part / stemset.MODEL_FILE, record)
        dest = folder / name
        if dest.exists():  # an older separation by this model: replaced whole
            old = folder / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(part, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(part, dest)
    except BaseException:
        writer.discard()
        shutil.rmtree(part, ignore_errors=True)
        raise
    return record


def _drop_set(folder: Path) -> None:
    """Remove the set's ``stems.json`` before its models change (the stems are then
    absent, never half-made), and the flat ``<stem>.flac`` of a set stored before
    per-model folders."""
    try:
        old = json.loads((folder / stemset.SET_FILE).read_text())
    except (OSError, ValueError):
        old = None
    (folder / stemset.SET_FILE).unlink(missing_ok=True)
    if isinstance(old, dict) and "models" not in old:
        for stem in old.get("sources") or []:
            (folder / f"{stem}.{STEM_FORMAT}").unlink(missing_ok=True)


def separate_to_folder(source: Path, folder: Path, job_id: str, separator,
                       progress: Callable[[float], None] | None = None) -> dict:
    """Separate ``source`` with the models of ``separator.plan`` (``imaker.stemset``) and
    store each model's stems losslessly in ``folder/<model>/``, then the set in
    ``stems.json``. ``separator``: ``plan``, ``load(name)`` (a loaded model of either
    family), ``key(loaded)`` (what its stems depend on besides the source),
    ``describe(loaded)`` (its provenance) and ``separate(loaded, wav, sink=, inplace=)``.
    A model whose stored stems were made from the same source with the same key is not
    run again. Every model is loaded before anything is written (a broken checkpoint
    fails the track with nothing half-written), and ``stems.json`` is removed while the
    set changes. What the separation service runs for each request; ``progress(fraction)``
    follows the written samples."""
    folder = Path(folder)
    p = separator.plan
    source_sha = _source_sha256(source)
    loaded = {name: separator.load(name) for name in p.models}
    records: dict[str, dict] = {}
    todo = []
    for name in p.models:
        key = {**separator.key(loaded[name]), "source": source_sha}
        rec = _stored_record(folder, name)
        if rec is not None and source_sha is not None and rec.get("key") == key:
            records[name] = rec
        else:
            todo.append((name, key))
    rates = {(loaded[n].samplerate, loaded[n].channels) for n in p.models}
    if len(rates) > 1:
        raise StageError(f"the models {', '.join(p.models)} do not share one sample rate and "
                         f"channel count ({sorted(rates)})")
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        _drop_set(folder)
    for i, (name, key) in enumerate(todo):
        step = (lambda f, i=i: progress((i + f) / len(todo))) if progress else None
        records[name] = _separate_model(source, folder, name, loaded[name], key, separator, step)
    stems = stemset.compose(p, records)
    used = [records[n] for n in p.models]
    first = used[0]
    meta = {
        "job_id": job_id,
        "sources": list(stems),
        # one model: its scale (the files of a set each carry their own, in "stems")
        "scale": first["scale"] if len(used) == 1 else 1.0,
        "sample_rate": first["sample_rate"],
        "channels": first["channels"],
        "duration_s": round(first["frames"] / first["sample_rate"], 4),
        "model": "+".join(r["name"] for r in used),
        "signature": "+".join(r["signature"] for r in used),
        "device": first["device"],
        "segment": separator.segment,
        "overlap": separator.overlap,
        "shifts": separator.shifts,
        "separation_seconds": round(sum(r["separation_seconds"] for r in used), 3),
        "instrumental_model": list(p.instrumental),
        "source_sha256": source_sha,
        "models": used,
        "stems": stems,
        "separated": [name for name, _ in todo],
        "at": utcnow(),
    }
    meta["data_version"] = stemset.data_version(meta)
    write_json_atomic(folder / stemset.SET_FILE, meta)
    return meta


def separate_stems(lib: Library, job_id: str, client, variants: list[str] | None = None) -> dict:
    """The stems stage: ask the separation service (``client.separate(job_id, source,
    stems_dir, variants=)``, see ``imaker.separator``) to separate the stored source into
    the stems store for the ``variants`` the track makes (they choose the models:
    ``imaker.stemset.plan``); it returns the stems' ``stems.json``."""
    source = lib.track_dir(job_id) / "source.flac"
    if not source.is_file():
        raise StageError(f"track {job_id} has no stored source: materialize source_audio first")
    return client.separate(job_id, source, lib.stem_dir(job_id), variants=variants)


def track_variants(options: Output, lib: Library, job_id: str,
                   extra_variants: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The variants a track makes: the settings', the bundle's and ``extra_variants``."""
    bundle = lib.bundle(job_id)
    return selected_variants([*(bundle.variants or []), *extra_variants],
                             no_drums=options.no_drums, drums_only=options.drums_only)


def stems_cover(lib: Library, job_id: str, variants: list[str]) -> bool:
    """Whether the stored stems make ``variants`` (a track separated without a drum
    variant under ``INSTRUMENTAL_MODEL`` has no demucs drums: a backfill that adds
    ``drums_only`` separates them first)."""
    try:
        sources = set(lib.read_json(job_id, "stems.json", stems=True)["sources"])
    except (StageError, KeyError):
        return False
    return all(VARIANTS[v].mentions - {stemset.VOCALS} <= sources for v in variants)


# ----- stage 3: variants ----------------------------------------------------------------
def make_variants(options: Output, lib: Library, job_id: str,
                  extra_variants: tuple[str, ...] | list[str] = ()) -> dict:
    """Mix every selected variant from the stored stems, encode, tag, publish (the
    ``OUTPUT``/``GENERATE_*`` settings, plus ``extra_variants`` for this run: a backfill)."""
    bundle = lib.bundle(job_id)
    stems_meta = lib.read_json(job_id, "stems.json", stems=True)
    rate, channels = stems_meta["sample_rate"], stems_meta["channels"]
    stem_files = stemset.terms(lib.stem_dir(job_id), stems_meta)
    names = track_variants(options, lib, job_id, extra_variants)
    fmt = options.audio_format
    base = track_basename(bundle.artist, bundle.title)
    out_dir = lib.output_dir(job_id)
    cover = bundle.media_path("cover") if bundle.cover else None
    try:  # the input's tags, copied onto every output (a library made before had none)
        copied = lib.read_json(job_id, "source.json").get("source_tags") or {}
    except StageError:
        copied = {}

    def tags(spec) -> audio_mod.Tags:
        return audio_mod.Tags(artist=bundle.artist, title=spec.tagged_title(bundle.title),
                              album=bundle.album, cover=cover, job_id=job_id,
                              variant=spec.name, copied=copied)

    rels = {name: f"files/audio/{base}{VARIANTS[name].suffix}{audio_mod.extension(fmt)}"
            for name in names}
    # each file is measured as it is encoded (levels, duration, EBU R128 for its ReplayGain
    # tags, sha256 and size of the tagged file) and never decoded again here: the records
    # carry the measurements to the manifest; the instrumental's waveform is drawn by its
    # own ffmpeg
    encoders = {
        VARIANTS[name]: audio_mod.Encoder(
            out_dir / rels[name], rate, channels, fmt, options.audio_bitrate,
            tags(VARIANTS[name]), measure=True, digest=True,
            waveform=VARIANT_WAVEFORM_COLOR if name == "instrumental" else None)
        for name in names}
    video_rel = f"files/video/{base}.mp4" if bundle.video else None
    staged = out_dir / "files" / "video" / f".{base[:40]}.staged.mp4" if video_rel else None
    if video_rel:
        # muxed from the instrumental's finished temporary file (before its rename), so
        # the published audio is read back only by the checks; the video is renamed into
        # place with the variants, never when one of them failed
        instrumental = encoders[VARIANTS["instrumental"]]
        instrumental.on_finished = lambda tmp: mux_video(
            bundle.media_path("video"), tmp, staged, audio_bitrate=options.audio_bitrate,
            audio_codec=instrumental.codec, tags=tags(VARIANTS["instrumental"]))
    # streamed in chunks (two passes over the stems: peaks, then mix + encode), every
    # variant's ffmpeg encoding at once; (tests/oracles.py: the same as mixing the whole track)
    try:
        gains = stream_mix(stem_files, encoders, samplerate=rate, channels=channels)
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    records = []
    for spec, encoder in encoders.items():
        rg = encoder.tags.replaygain
        if encoder.waveform is not None:
            with atomic_path(lib.track_dir(job_id)
                             / VARIANT_WAVEFORM.format(variant=spec.name)) as tmp:
                tmp.write_bytes(encoder.waveform)
        records.append({
            "kind": "audio", "variant": spec.name, "label": spec.label, "path": rels[spec.name],
            "gain_db": round(20 * np.log10(gains[spec.name]), 3),
            "stems": spec.stems_for(list(stem_files)),
            "title_tag": encoder.tags.title,
            **encoder.measurements(),
            "replaygain_track_gain_db": rg["gain_db"] if rg else None,
            "replaygain_track_peak": rg["peak"] if rg else None})
    if video_rel:
        os.replace(staged, out_dir / video_rel)
        records.append({"kind": "video", "variant": "instrumental", "label": "Video (instrumental)",
                        "path": video_rel})
    if options.preserve_stems:
        files = stemset.stored_files(lib.stem_dir(job_id), stems_meta)
        several = len({model for model, *_ in files}) > 1
        for model, stem, path, scale in files:
            shown = f"{stem}, {model}" if several else stem
            rel = f"files/stems/{base} ({shown}).flac"
            dest = out_dir / rel
            with atomic_path(dest) as tmp:
                digest = copy_hashing(path, tmp)  # hashed as it is copied
            st = dest.stat()
            records.append({"kind": "stems", "variant": stem, "label": f"Stem ({shown})",
                            "path": rel, "scale": scale, "model": model,
                            "codec": STEM_FORMAT, "sample_rate": rate, "channels": channels,
                            "duration_s": stems_meta["duration_s"], "sha256": digest,
                            "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    meta = {"job_id": job_id, "format": fmt, "artifacts": records,
            "stems_preserved": options.preserve_stems, "at": utcnow()}
    write_json_atomic(lib.track_dir(job_id) / "variants.json", meta)
    return meta


# ----- stage 4: manifest ----------------------------------------------------------------
def write_manifest(store: QueueStore, lib: Library, job_id: str, drop_id: str | None = None,
                   code_versions: dict[str, str] | None = None) -> JobManifest:
    """Describe every artifact, write manifest.json last and atomically, then archive the
    bundle to done/. A file the variants step measured as it wrote it (its record holds
    the codec, duration, sha256, size and mtime) is described from its record when its
    size and mtime are still the recorded ones; others (the video, a record made before
    the measurements, a file changed since) are probed and hashed here. What was listed
    is kept in the library (``MANIFEST_FILES``) for the ``manifest_matches_files`` check."""
    bundle = lib.bundle(job_id)
    source = lib.read_json(job_id, "source.json")
    stems_meta = lib.read_json(job_id, "stems.json", stems=True)
    variants = lib.read_json(job_id, "variants.json")
    out_dir = lib.output_dir(job_id)
    artifacts = []
    listed = {}
    for rec in variants["artifacts"]:
        path = out_dir / rec["path"]
        if not path.is_file():
            raise StageError(f"{rec['path']} listed by the variants step is missing")
        st = path.stat()
        if _as_recorded(rec, st):
            codec, duration, rate, channels = (rec["codec"], rec["duration_s"],
                                               rec["sample_rate"], rec["channels"])
            size, digest = rec["size_bytes"], rec["sha256"]
        else:
            info = audio_mod.probe(path)
            if info["audio"] is None:
                raise StageError(f"{rec['path']} has no audio stream")
            codec = info["audio"]["codec"]
            if rec["kind"] == "video" and info["video"]:
                codec = f"{info['video']['codec']}+{codec}"
            duration, rate, channels = (info["duration_s"] or 0.0, info["audio"]["sample_rate"],
                                        info["audio"]["channels"])
            size, digest = st.st_size, sha256_file(path)
        listed[rec["path"]] = {"sha256": digest, "size_bytes": size, "mtime_ns": st.st_mtime_ns}
        artifacts.append(ArtifactMetadata(
            kind=rec["kind"], variant=rec["variant"], label=rec["label"], path=rec["path"],
            codec=codec, duration_s=round(duration, 3), sample_rate=rate, channels=channels,
            size_bytes=size, sha256=digest,
            gain_db=rec.get("gain_db"), loudness_lufs=_finite(rec.get("loudness_lufs")),
            replaygain_track_gain_db=rec.get("replaygain_track_gain_db"),
            replaygain_track_peak=rec.get("replaygain_track_peak")))
    write_json_atomic(lib.track_dir(job_id) / MANIFEST_FILES, {"job_id": job_id, "files": listed})
    manifest = JobManifest(
        job_id=job_id, source_type=bundle.source_type, artist=bundle.artist, album=bundle.album,
        title=bundle.title, stems_preserved=bool(variants.get("stems_preserved")),
        artifacts=artifacts,
        provenance={
            "source": {"type": bundle.source_type, "url": bundle.source_url,
                       "input_sha256": source["input_sha256"], "input_file": source["input_file"],
                       "input_peak_dbfs": source.get("input_peak_dbfs"),
                       "duration_s": source["duration_s"]},
            "separation": {"model": stems_meta["model"], "signature": stems_meta["signature"],
                           "device": stems_meta["device"], "segment": stems_meta["segment"],
                           "shifts": stems_meta["shifts"], "overlap": stems_meta["overlap"],
                           "seconds": stems_meta["separation_seconds"],
                           "separated_at": stems_meta["at"],
                           "instrumental_model": stems_meta.get("instrumental_model") or [],
                           "models": [_model_provenance(m) for m in
                                      stems_meta.get("models") or []]},
            "software": software_versions(),
            "code_versions": dict(code_versions or {}),
            "created_at": utcnow(),
        })
    manifest.save(out_dir)
    if drop_id:
        store.archive_done(job_id, drop_id)
    return manifest


def _as_recorded(rec: dict, st: os.stat_result) -> bool:
    """Whether ``rec`` (variants.json) measured the file and it is unchanged since: same
    size and mtime as when its sha256 was taken."""
    keys = ("codec", "duration_s", "sample_rate", "channels", "size_bytes", "sha256", "mtime_ns")
    return all(rec.get(k) is not None for k in keys) and rec["size_bytes"] == st.st_size \
        and rec["mtime_ns"] == st.st_mtime_ns


def _model_provenance(record: dict) -> dict:
    """One model of the separation in the manifest (``model.json``'s own fields)."""
    keys = ("name", "family", "architecture", "sha256", "signature", "stems", "device",
            "precision")
    out = {k: record.get(k) for k in keys}
    out["stems"] = list(record.get("stems") or record.get("sources") or [])
    return out


def _finite(value):
    return value if isinstance(value, (int, float)) and np.isfinite(value) else None


def software_versions() -> dict[str, str]:
    out = {}
    for key, dist in (("instrumental_maker", "instrumental-maker"), ("demucs", "demucs"),
                      ("dagster", "dagster"), ("torch", "torch")):
        try:
            out[key] = pkg_version(dist)
        except Exception:  # noqa: BLE001 - a missing optional package is not an error here
            out[key] = "unknown"
    return out
