"""An oracle "separation model" for benchmarks and tests only (issue 22): it returns the
known stems of a generated song (``imaker dev-song``, MUSDB18-HQ layout), so that the
pipeline's own cost can be measured without a neural network — the pipeline's ceiling.

It is never a default and never fetched: it exists where a benchmark or a test writes
``<name>.oracle.json`` into a model repo (``DEMUCS_MODEL_REPO``) and sets
``DEMUCS_MODEL=<name>``. The separation service then loads it by name like any model
(``imaker.separation.load_model``, one dispatch on that file) and streams its stems through
the same sink as a real model (``sink(start, chunk)``, chunk ``(sources, channels, n)``),
so the stems store, ``stems.json`` and everything downstream run the product's code path::

    {"oracle": 1, "songs": ["/abs/folder", "relative/to/the/repo"]}

``songs``: generated song folders (holding ``song.json``, ``mixture.wav`` and the four
stem WAVs), or folders of them. Which song a request is: the decoded source (the service
decodes ``library/<job_id>/source.flac`` to 44.1 kHz stereo float, as for any model) is
compared with each candidate's ``mixture.wav`` (same number of frames) on a few short
windows spread over the track; the closest one is taken when it matches to better than
``MATCH_SNR_DB`` (a FLAC source matches exactly, an AAC 256k one to ~30 dB; a lossy decode
may be a few hundred frames longer: the stems are padded). So nothing
but the audio is needed (no job id, no bundle field); a source that matches no song fails
the separation with a message naming the folders searched.

Sources are demucs' (drums, bass, other, vocals), so every variant works. No torch, no
Dagster: reading the stems (memory-mapped WAVs) is all the "model" costs.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import numpy as np

SUFFIX = ".oracle.json"
SOURCES = ("drums", "bass", "other", "vocals")  # demucs' order (= imaker.devsong.SOURCES)
SAMPLE_RATE = 44100
CHANNELS = 2
#: a decoded source must match a song's mixture this well on the probe windows
MATCH_SNR_DB = 20.0
#: a lossy source may be longer or shorter than the song by up to this many frames (an AAC
#: decode ends on a whole 1024-frame packet: 8 s came back 480 frames longer); the stems
#: are then cut or padded with silence at the end to the source's length
LENGTH_SLACK = 4096
PROBE_WINDOWS = 5
PROBE_FRAMES = 1 << 14  # ~0.37 s per window
CHUNK_FRAMES = 1 << 18  # frames per sink call (~6 s, like the variants stage's chunks)

_CACHE: dict[str, "LoadedModel"] = {}  # noqa: F821 - imaker.separation.LoadedModel
_LOCK = threading.Lock()


class OracleError(RuntimeError):
    pass


def spec_path(name: str, repo: Path) -> Path:
    return Path(repo) / f"{name}{SUFFIX}"


def is_oracle(name: str, repo: Path | None) -> bool:
    return repo is not None and spec_path(name, repo).is_file()


def write_spec(repo: Path, songs: list[Path], name: str = "oracle") -> Path:
    """Write ``<repo>/<name>.oracle.json`` naming ``songs`` (folders); returns its path."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    path = spec_path(name, repo)
    path.write_text(json.dumps({"oracle": 1, "songs": [str(Path(s).resolve()) for s in songs]},
                               indent=2) + "\n")
    return path


def wav_frames(path: Path) -> np.ndarray:
    """A float32 WAV (what dev-song writes) memory-mapped as ``(frames, channels)``."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise OracleError(f"{path}: not a WAV file")
        fmt, pos = None, 12
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                raise OracleError(f"{path}: no data chunk")
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                body = fh.read(size + (size & 1))
                fmt = struct.unpack("<HHIIHH", body[:16])
            elif cid == b"data":
                if fmt is None or fmt[0] != 3 or fmt[5] != 32:
                    raise OracleError(f"{path}: the oracle reads 32-bit float WAVs (dev-song's)")
                channels = fmt[1]
                return np.memmap(path, dtype="<f4", mode="r", offset=pos + 8,
                                 shape=(size // (4 * channels), channels))
            else:
                fh.seek(size + (size & 1), 1)
            pos += 8 + size + (size & 1)


class OracleModel:
    """The known stems of the generated songs listed in a spec file."""

    is_oracle = True  # what imaker.separation.separate dispatches on
    samplerate = SAMPLE_RATE
    audio_channels = CHANNELS
    sources = SOURCES

    def __init__(self, spec: Path):
        self.spec = Path(spec)
        data = json.loads(self.spec.read_text())
        if data.get("oracle") != 1 or not isinstance(data.get("songs"), list):
            raise OracleError(f"{self.spec}: expected {{\"oracle\": 1, \"songs\": [...]}}")
        self.roots = [(self.spec.parent / s).resolve() for s in data["songs"]]

    def songs(self) -> list[tuple[Path, int]]:
        """(song folder, frames) of every song under the roots (read per request: songs
        generated after the service started are found)."""
        found = []
        for root in self.roots:
            for meta in ([root / "song.json"] if (root / "song.json").is_file()
                         else sorted(root.glob("*/song.json"))):
                try:
                    info = json.loads(meta.read_text())
                except (OSError, ValueError):
                    continue
                if info.get("samplerate", SAMPLE_RATE) == SAMPLE_RATE:
                    found.append((meta.parent, int(info["frames"])))
        return found

    def find(self, wav: np.ndarray) -> Path:
        """The song whose mixture ``wav`` (channels, frames) is."""
        frames = wav.shape[1]
        best, best_snr = None, -np.inf
        for folder, n in sorted(self.songs(), key=lambda fn: abs(fn[1] - frames)):
            if abs(n - frames) > LENGTH_SLACK:
                continue
            if best_snr > 100:  # an exact match: the others are not looked at
                break
            common = min(n, frames)
            starts = np.linspace(0, max(common - PROBE_FRAMES, 0), PROBE_WINDOWS).astype(int)
            mix = wav_frames(folder / "mixture.wav")
            sig = err = 0.0
            for a in starts:
                b = min(a + PROBE_FRAMES, common)
                ref = np.asarray(mix[a:b].T, dtype=np.float64)
                got = wav[:, a:b].astype(np.float64)
                sig += float(np.sum(ref * ref))
                err += float(np.sum((got - ref) ** 2))
            snr = 10 * np.log10((sig + 1e-30) / (err + 1e-30))
            if snr > best_snr:
                best, best_snr = folder, snr
        if best is None or best_snr < MATCH_SNR_DB:
            why = (f"the closest one matches to {best_snr:.1f} dB" if best is not None
                   else f"none has {frames} ± {LENGTH_SLACK} frames")
            raise OracleError(f"the oracle model knows no song matching this source "
                              f"({frames} frames; {why}); songs searched under "
                              f"{', '.join(map(str, self.roots))} ({self.spec})")
        return best

    def separate(self, wav: np.ndarray, sink=None):
        """The known stems of the song ``wav`` is: streamed to ``sink(start, chunk)`` with
        ``chunk`` float32 ``(sources, channels, n)``, or returned as ``{source: array}``."""
        if wav.ndim != 2 or wav.shape[0] != CHANNELS:
            raise OracleError(f"expected {CHANNELS} channels, got shape {wav.shape}")
        folder = self.find(wav)
        stems = [wav_frames(folder / f"{s}.wav") for s in SOURCES]
        frames = wav.shape[1]
        chunk = np.zeros((len(SOURCES), CHANNELS, min(CHUNK_FRAMES, frames)), dtype=np.float32)
        whole = None if sink is not None else np.zeros((len(SOURCES), CHANNELS, frames), np.float32)
        for start in range(0, frames, CHUNK_FRAMES):
            n = min(CHUNK_FRAMES, frames - start)
            chunk[:, :, :n] = 0.0
            for i, a in enumerate(stems):
                part = a[start:start + n]  # shorter (or empty) past the song's end
                chunk[i, :, :len(part)] = part.T
            if sink is not None:
                sink(start, chunk[:, :, :n])
            else:
                whole[:, :, start:start + n] = chunk[:, :, :n]
        if sink is None:
            return {s: whole[i] for i, s in enumerate(SOURCES)}
        return None


def load_oracle(name: str, repo: Path):
    """The ``imaker.separation.LoadedModel`` of the oracle ``<repo>/<name>.oracle.json``."""
    from .separation import LoadedModel

    spec = spec_path(name, repo)
    digest = hashlib.sha256(spec.read_bytes()).hexdigest()[:8]
    key = f"{spec.resolve()}:{digest}"
    with _LOCK:
        if key not in _CACHE:
            model = OracleModel(spec)
            _CACHE[key] = LoadedModel(name=name, signature=f"oracle-{digest}", device="cpu",
                                      model=model, samplerate=SAMPLE_RATE, channels=CHANNELS,
                                      sources=SOURCES, repo=Path(repo))
        return _CACHE[key]
