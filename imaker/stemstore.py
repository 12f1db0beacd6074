"""Writing separated stems as they stream out of the model (no Dagster).

The stems store keeps each stem as 24-bit FLAC scaled by one factor for all stems
(``stems.json`` "scale": 1.0 unless some stem peaks at or above ``audio.FLAC24_CEILING``,
a hair under full scale, then ``FLAC24_CEILING / peak``), so the factor is only known
once the whole track is separated.
``RawStemWriter`` therefore appends every chunk the model hands over to one raw float32
file per stem (in the stem folder, so it is on the same disk; page cache, not process
memory) while tracking the peak, and ``encode_all`` then encodes the raw files to FLAC
with the scale, one ffmpeg per stem in parallel, each to a temporary name renamed into
place. Peak memory is one chunk, whatever the track length.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .audio import FLAC24_CEILING, FORMATS, AudioError, tool_path, write_failure
from .fsutil import atomic_path, naming


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

    def encode_all(self, samplerate: int, fmt: str = "flac") -> float:
        """Encode every raw stem to ``<name>.<fmt>`` (scaled by ``scale``), in parallel;
        removes the raw files. Returns the scale."""
        self.close()
        scale = self.scale
        try:
            if self.frames == 0 or not self.channels:
                raise AudioError("the separation produced no audio")
            workers = max(1, min(len(self.sources), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda name: encode_raw(
                    self.paths[name], samplerate, self.channels,
                    self.folder / f"{name}{FORMATS[fmt][0]}", fmt, gain=scale), self.sources))
        finally:
            self.discard()
        return scale


def encode_raw(raw: Path, samplerate: int, channels: int, dest: Path, fmt: str,
               gain: float = 1.0) -> Path:
    """ffmpeg-encode a raw interleaved float32 file to ``dest`` (temp name + rename)."""
    ext, codec_args, _ = FORMATS[fmt]
    if Path(dest).suffix != ext:
        raise AudioError(f"{Path(dest).name}: a {fmt} file must end in {ext}")
    gain_args = [] if gain == 1.0 else ["-af", f"volume={gain!r}:precision=float"]
    with atomic_path(Path(dest)) as tmp:
        proc = subprocess.run(
            [tool_path("ffmpeg"), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar",
             str(samplerate), "-ac", str(channels), "-i", str(raw), *gain_args, *codec_args,
             str(tmp)], capture_output=True)
        why = write_failure(proc.returncode, proc.stderr)
        if why is not None:
            raise AudioError(f"cannot encode {dest}: {why}")
    return Path(dest)
