"""Writing separated stems as they stream out of the model (no Dagster).

The stems store keeps each stem as 24-bit FLAC scaled by one factor for all stems
(``stems.json`` "scale": 1.0 unless some stem peaks at or above ``audio.FLAC24_CEILING``,
a hair under full scale, then ``FLAC24_CEILING / peak``), so the factor is only known
once the whole track is separated.
``RawStemWriter`` therefore appends every chunk the model hands over to one raw float32
file per stem (in the stem folder, so it is on the same disk; page cache, not process
memory) while tracking the peak, and ``encode_all`` then encodes the raw files to FLAC
with the scale, in this process (``audio.FlacWriter``: libFLAC, one thread per stem in
parallel), each to a temporary name renamed into place. Peak memory is one chunk, whatever
the track length.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .audio import CHUNK_FRAMES, FLAC24_CEILING, AudioError, FlacWriter
from .fsutil import naming

#: the format of every stored stem (and of the stored source, ``pipeline``): lossless, so a
#: backfill mixes from exactly what the separation gave
STEM_FORMAT = "flac"


class RawStemWriter:
    """``sink(start, chunk)`` for ``imaker.separation.separate``: ``chunk`` is
    ``(sources, channels, n)`` float32 for samples ``start .. start + n`` in order."""

    def __init__(self, folder: Path, sources: list[str] | tuple[str, ...]):
        self.folder = Path(folder)
        self.sources = list(sources)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths = {name: self.folder / f".{name}.f32.part" for name in self.sources}
        self._files = {name: open(path, "wb") for name, path in self.paths.items()}
        self.frames = 0
        self.peak = 0.0
        self.channels: int | None = None

    def __call__(self, start: int, chunk: np.ndarray) -> None:
        if start != self.frames:
            raise RuntimeError(f"stem chunk at {start}, expected {self.frames}")
        if chunk.shape[0] != len(self.sources):
            raise RuntimeError(f"{chunk.shape[0]} stems in a chunk, expected {len(self.sources)}")
        self.channels = int(chunk.shape[1])
        if chunk.size:
            self.peak = max(self.peak, float(np.max(np.abs(chunk))))
        for i, name in enumerate(self.sources):
            with naming(self.paths[name]):  # a full disk names the stem file
                self._files[name].write(np.ascontiguousarray(chunk[i].T, dtype="<f4").tobytes())
        self.frames += int(chunk.shape[-1])

    @property
    def scale(self) -> float:
        return 1.0 if self.peak < FLAC24_CEILING else FLAC24_CEILING / self.peak

    def close(self) -> None:
        for fh in self._files.values():
            if not fh.closed:
                fh.close()

    def discard(self) -> None:
        self.close()
        for path in self.paths.values():
            path.unlink(missing_ok=True)

    def encode_all(self, samplerate: int) -> float:
        """Encode every raw stem to ``<name>.flac`` (``STEM_FORMAT``), scaled by ``scale``,
        in parallel; removes the raw files. Returns the scale."""
        self.close()
        scale = self.scale
        try:
            if self.frames == 0 or not self.channels:
                raise AudioError("the separation produced no audio")
            workers = max(1, min(len(self.sources), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda name: encode_raw(
                    self.paths[name], samplerate, self.channels,
                    self.folder / f"{name}.{STEM_FORMAT}", gain=scale), self.sources))
        finally:
            self.discard()
        return scale


def encode_raw(raw: Path, samplerate: int, channels: int, dest: Path,
               gain: float = 1.0) -> Path:
    """Encode a raw interleaved float32 file, times ``gain``, to the 24-bit FLAC ``dest``
    (temp name + rename), chunk by chunk."""
    with open(raw, "rb") as fh, FlacWriter(dest, samplerate, channels) as out:
        while True:
            block = np.fromfile(fh, dtype="<f4", count=CHUNK_FRAMES * channels)
            if not block.size:
                break
            if gain != 1.0:
                block *= np.float32(gain)
            out.write(block.reshape(-1, channels).T)  # a view; written without a copy
    return Path(dest)
