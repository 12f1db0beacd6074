"""Audio decode / encode / probe / tag with the real ffmpeg, ffprobe and mutagen (no Dagster)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from .fsutil import atomic_path

FORMATS = {
    # name: (extension, ffmpeg codec args, manifest codec)
    "m4a": (".m4a", ["-c:a", "aac", "-movflags", "+faststart"], "aac"),
    "mp3": (".mp3", ["-c:a", "libmp3lame"], "mp3"),
    "flac": (".flac", ["-c:a", "flac", "-sample_fmt", "s32", "-bits_per_raw_sample", "24"], "flac"),
}
#: the largest sample the 24-bit FLAC of the stored source and stems keeps without clipping
#: (a hair under full scale): audio that peaks at or above it is stored scaled down by one
#: constant (source.json's and stems.json's ``scale``) and divided back by every reader
FLAC24_CEILING = 1.0 - 2.0 ** -20
MAX_COVER_BYTES = 10 * 1024 * 1024
#: Frames per chunk of the streaming decoder/encoder: about 6 s at 44.1 kHz, 2 MiB of
#: float32 stereo. Long tracks are never held whole.
CHUNK_FRAMES = 2**18


class AudioError(RuntimeError):
    """Audio that cannot be decoded, encoded or probed; the message is for a person."""


def tool_path(name: str) -> str:
    """The path of an installed tool (``ffmpeg``, ``ffprobe``); AudioError when missing."""
    path = shutil.which(name)
    if path is None:
        raise AudioError(f"{name} is not installed (apt-get install ffmpeg)")
    return path


def stderr_tail(stderr: bytes, lines: int = 3) -> str:
    """The last ``lines`` lines of a tool's stderr, on one line (what an error message quotes)."""
    text = stderr.decode("utf-8", "replace").strip().splitlines()
    return " | ".join(text[-lines:]) if text else "no message"


def probe(path: Path) -> dict:
    """ffprobe a media file: {'duration_s', 'audio': {...} | None, 'video': {...} | None}."""
    proc = subprocess.run(
        [tool_path("ffprobe"), "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise AudioError(f"cannot read {Path(path).name}: {stderr_tail(proc.stderr)}")
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams", [])
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    duration = info.get("format", {}).get("duration")
    return {
        "duration_s": float(duration) if duration not in (None, "N/A") else None,
        "audio": None if audio is None else {
            "codec": audio.get("codec_name"), "sample_rate": int(audio.get("sample_rate", 0)),
            "channels": int(audio.get("channels", 0))},
        "video": None if video is None else {"codec": video.get("codec_name")},
    }


def decode(path: Path, samplerate: int, channels: int, scratch: Path | None = None, *,
           stored: bool = False) -> np.ndarray:
    """Decode the first audio stream of ``path`` to float32 ``(channels, samples)``: the
    chunks of ``iter_decode`` (its errors; ``stored`` is its), gathered.

    With ``scratch`` (a folder) they are gathered in an unnamed temporary file there, which
    the returned array maps (a writable ``np.memmap``; the file is gone with the array): a
    long track then lives in the page cache, which the kernel writes back and reclaims
    under pressure, not in the process's own memory (1.2 GiB of float32 per hour of
    stereo, decoded by the stages that need the whole track at once: the source's scale,
    the separation's normalisation). Without it, in memory."""
    # a failure kills ffmpeg (closes the file)
    with closing(iter_decode(path, samplerate, channels, stored=stored)) as chunks:
        if scratch is None:
            parts = list(chunks)
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return _gather_in_file(chunks, channels, Path(scratch), Path(path).name)


def _gather_in_file(chunks: Iterator[np.ndarray], channels: int, scratch: Path,
                    name: str) -> np.ndarray:
    """The chunks as one planar ``(channels, frames)`` array mapped from an unnamed file in
    ``scratch``: each channel appended to a file of its own while decoding, the others
    then appended to the first (a planar layout is what the readers slice)."""
    files = [tempfile.TemporaryFile(dir=scratch) for _ in range(channels)]
    try:
        frames = 0
        try:
            for chunk in chunks:
                for fh, row in zip(files, chunk):
                    fh.write(row)  # a C-contiguous row: no copy
                frames += chunk.shape[1]
            for fh in files[1:]:
                fh.seek(0)
                shutil.copyfileobj(fh, files[0], 1 << 20)
            files[0].flush()
        except OSError as exc:  # a full disk, a quota: name the folder
            raise AudioError(f"cannot decode {name}: writing its samples to {scratch} failed: "
                             f"{exc.strerror or exc}") from None
        return np.memmap(files[0], dtype="<f4", mode="r+", shape=(channels, frames))
    finally:
        for fh in files:  # the mapping keeps the first one's data
            fh.close()


def peak_rms(wav: np.ndarray, chunk_frames: int = CHUNK_FRAMES) -> tuple[float, float]:
    """Sample peak and RMS of ``(channels, samples)``, chunk by chunk (no whole-track
    temporaries: ``np.abs`` or a float64 square of a 1-hour track are 1.2 and 2.4 GiB)."""
    levels = Levels()
    for start in range(0, wav.shape[-1], chunk_frames):
        levels.add(wav[..., start:start + chunk_frames])
    return levels.peak, levels.rms


def write_failure(returncode: int, stderr: bytes) -> str | None:
    """Why an ffmpeg run that *writes* a file (at ``-v error``) failed, or None. ffmpeg exits
    0 when writing the trailer meets a full disk ("Error writing trailer ...: No space
    left on device"), so any error it printed fails the file too; killed by a signal
    (SIGXFSZ past a file size limit) says so."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        tail = stderr_tail(stderr) if stderr.strip() else ""
        return f"ffmpeg was killed by {name}" + (f": {tail}" if tail else "")
    if returncode != 0 or stderr.strip():
        return stderr_tail(stderr)
    return None



#: ``-loglevel level+<level>`` prefixes each message with its level: the measuring encoder
#: logs at ``info`` (ebur128's summary) and still tells an error from the rest
_LOG_LEVEL = re.compile(r"^((?:\[[^\]]* @ [^\]]*\] )*)\[(panic|fatal|error|warning|info|"
                        r"verbose|debug|trace)\] ")
_ERROR_LEVELS = ("panic", "fatal", "error")


def error_lines(stderr: bytes) -> bytes:
    """The lines of a ``-loglevel level+...`` stderr logged at ``error`` or worse (what
    ``-v error`` would have printed). A line without a level prefix continues the message
    before it (a multi-line message is prefixed once)."""
    level, out = "info", []
    for line in stderr.decode("utf-8", "replace").splitlines():
        m = _LOG_LEVEL.match(line)
        if m:
            level = m.group(2)
            line = m.group(1) + line[m.end():]  # as -v error prints it
        if level in _ERROR_LEVELS:
            out.append(line)
    return "\n".join(out).encode()


def parse_ebur128(log: str) -> dict:
    """Integrated loudness (LUFS), loudness range (LU) and, where it was asked for
    (``peak=true``), the true peak (dBTP) from the last ``Summary:`` that ffmpeg's ebur128
    filter logs (at ``info``) when it ends."""
    at = log.rfind("Summary:")
    summary = log[at:] if at >= 0 else ""

    def grab(label: str) -> float | None:
        m = re.search(r"\b" + label + r":\s+(-?[\d.]+|-inf)", summary)
        if not m:
            return None
        return float("-inf") if m.group(1) == "-inf" else float(m.group(1))

    return {"integrated_lufs": grab("I"), "loudness_range_lu": grab("LRA"),
            "true_peak_dbtp": grab("Peak")}


def dbfs(x: float) -> float:
    """A linear amplitude in dBFS, rounded to 0.01 dB (``-inf`` for 0)."""
    return round(float(20 * np.log10(x)), 2) if x > 0 else float("-inf")


class Levels:
    """Sample peak and RMS of the chunks ``add``-ed so far (the squares summed in float64):
    the one accumulator of the encoder, the checks' one read of a file and the source
    stage. Not ``np.dot`` for the squares: that is OpenBLAS, whose worker threads spin
    after each call — in a run process that mixes and encodes, they burned about as much
    CPU as the mixing itself (perf, issue 22)."""

    def __init__(self):
        self.peak = 0.0
        self.squares = 0.0
        self.count = 0  # samples (every channel)

    def add(self, samples: np.ndarray) -> None:
        if samples.size:
            flat = samples.ravel()
            self.peak = max(self.peak, float(np.max(np.abs(flat))))
            self.squares += float(np.square(flat, dtype=np.float64).sum())
            self.count += flat.size

    @property
    def rms(self) -> float:
        return float(np.sqrt(self.squares / self.count)) if self.count else 0.0


#: the waveform picture drawn for the UI (``Encoder(waveform=...)``, ``analysis.waveform_png``)
WAVEFORM_SIZE = (800, 120)


def waveform_filter(color: str, width: int = WAVEFORM_SIZE[0],
                    height: int = WAVEFORM_SIZE[1]) -> str:
    """The filter chain that draws an audio stream's waveform picture (mono, one frame)."""
    return (f"aformat=channel_layouts=mono,showwavespic=s={width}x{height}:colors={color}")

def _read_stderr(fh: IO[bytes]) -> str:
    fh.seek(0)
    return stderr_tail(fh.read())


def _reap(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs and wait for it (never leaves a zombie behind)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def iter_decode(path: Path, samplerate: int, channels: int,
                chunk_frames: int = CHUNK_FRAMES, *, stored: bool = False) -> Iterator[np.ndarray]:
    """Decode the first audio stream of ``path`` chunk by chunk: float32 ``(channels, n)``
    arrays of ``chunk_frames`` frames (the last one shorter), read from one ffmpeg process.
    ``stored=True``: a file the pipeline stored (the source and stems, FLAC at ``samplerate``
    with ``channels``) is read in this process instead (``_open_flac``); inputs from outside
    are always read by ffmpeg, which decodes every format alike (and conceals a damaged
    frame where libsndfile stops).

    Concatenated, the chunks equal ``decode(path, samplerate, channels)`` sample for sample.
    Errors are ``decode``'s; an ffmpeg failure late in the file is raised after the chunks
    decoded before it, so a consumer must not publish anything before the iterator ends.
    Closing the iterator early (``break``, an exception, ``close()``) kills ffmpeg."""
    if chunk_frames < 1:
        raise ValueError("chunk_frames must be at least 1")
    name = Path(path).name
    flac = _open_flac(path, samplerate, channels) if stored else None
    if flac is not None:
        yield from _iter_flac(flac, name, chunk_frames)
        return
    frame_bytes = 4 * channels
    with ExitStack() as stack:
        stderr = stack.enter_context(tempfile.TemporaryFile())  # a file: never blocks ffmpeg
        proc = subprocess.Popen(
            [tool_path("ffmpeg"), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
             "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(samplerate),
             "pipe:1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            bufsize=0)
        stack.callback(proc.stdout.close)
        stack.callback(_reap, proc)  # runs first: kill, wait, then close the pipe
        buf = np.empty(chunk_frames * channels, dtype="<f4")
        view = memoryview(buf).cast("B")
        total = 0
        while True:
            filled = 0
            while filled < len(view):
                n = proc.stdout.readinto(view[filled:])
                if not n:
                    break
                filled += n
            frames = filled // frame_bytes
            if frames:
                chunk = buf[: frames * channels].reshape(frames, channels).T.copy()
                if not np.isfinite(chunk).all():
                    raise AudioError(f"{name} decodes to non-finite samples")
                total += frames
                yield chunk
            if filled < len(view):  # end of stream (a trailing partial frame is dropped)
                break
        if proc.wait() != 0:
            raise AudioError(f"cannot decode {name}: {_read_stderr(stderr)}")
        if total == 0:
            raise AudioError(f"cannot decode {name}: no audio samples")


def _open_flac(path: Path, samplerate: int, channels: int) -> "soundfile.SoundFile | None":
    """libsndfile's reader of ``path`` when it is a FLAC file at ``samplerate`` with
    ``channels`` (what the pipeline stores: ``source.flac``, the stems), else None: ffmpeg
    decodes everything else (other codecs, resampling, channel layouts) and reports what
    libsndfile cannot open. Read in this process, a stored file costs no ffmpeg start (50
    ms of CPU each: it loads 215 shared libraries, and a track's stems and source are read
    7 times) and about half the decoding CPU (a 4-minute stem: 0.26 CPU-s against 0.48 with
    the pipe); the samples are the same (both scale the integers by 2^-(bits-1))."""
    if Path(path).suffix.lower() != ".flac":
        return None
    import soundfile  # here: 12 ms of imports that only readers and writers of FLAC need

    try:
        stored = soundfile.SoundFile(str(path))
    except (soundfile.LibsndfileError, OSError):
        return None
    # a length in the header: a FLAC written as a stream (to a pipe) has none, and
    # libsndfile then fails to read it where ffmpeg does not (it reports 2^63 - 1 frames)
    known_length = 0 < stored.frames < 2**62
    if (stored.format != "FLAC" or stored.samplerate != samplerate
            or stored.channels != channels or not known_length):
        stored.close()
        return None
    return stored


def _sndfile_reason(exc: BaseException) -> str:
    """A person's reason for a libsndfile failure: its message, or for a failed system
    call (a full disk, a quota) the system's, which libsndfile reduces to "System error"
    (the errno of the failed call is in cffi's per-thread copy)."""
    import soundfile

    if isinstance(exc, soundfile.LibsndfileError):
        errno = getattr(getattr(soundfile, "_ffi", None), "errno", 0)
        if exc.code == 2 and errno:  # SF_ERR_SYSTEM
            return os.strerror(errno)
        text = re.sub(r"^Error\s*:\s*", "", exc.error_string.strip()).rstrip(".")
        return text or "libsndfile error"
    return str(exc) or type(exc).__name__


def _iter_flac(stored: "soundfile.SoundFile", name: str, chunk_frames: int
               ) -> Iterator[np.ndarray]:
    """``iter_decode``'s chunks from an open FLAC file (``_open_flac``), with its errors: a
    file that ends before the frame count of its header is an error, as is an empty one."""
    import soundfile

    with stored:
        buf = np.empty((chunk_frames, stored.channels), dtype="<f4")
        total = 0
        while True:
            try:  # libsndfile's read releases the GIL (cffi): stems decode in parallel threads
                got = stored.read(chunk_frames, dtype="float32", out=buf)
            except (soundfile.LibsndfileError, OSError) as exc:
                raise AudioError(f"cannot decode {name}: {_sndfile_reason(exc)}") from None
            if len(got):
                total += len(got)
                yield got.T.copy()
            if len(got) < chunk_frames:
                break
        if total < stored.frames:
            raise AudioError(f"cannot decode {name}: it ends after {total} of the "
                             f"{stored.frames} frames its header announces")
        if total == 0:
            raise AudioError(f"cannot decode {name}: no audio samples")


class FlacWriter:
    """``with FlacWriter(dest, samplerate, channels) as out: out.write(chunk)``: float
    ``(channels, n)`` chunks to a 24-bit FLAC file, in this process (libsndfile + libFLAC:
    no ffmpeg start per stem), at a temporary name beside ``dest`` renamed into place when
    the block ends without an exception (a failure leaves nothing under ``dest``).
    Samples must lie in [-1, 1): libsndfile rounds them to 24 bits and does not clip (the
    stems store scales them below ``FLAC24_CEILING`` first)."""

    def __init__(self, dest: Path, samplerate: int, channels: int):
        self.dest, self.samplerate, self.channels = Path(dest), samplerate, channels
        self._stack: ExitStack | None = None
        self._file: soundfile.SoundFile | None = None

    def __enter__(self) -> "FlacWriter":
        import soundfile

        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.dest))
            self._file = self._failing(lambda: soundfile.SoundFile(
                str(tmp), "w", self.samplerate, self.channels, "PCM_24", format="FLAC"))
            self._stack = stack.pop_all()
        return self

    def _failing(self, call):
        try:
            return call()
        except (RuntimeError, OSError) as exc:  # soundfile.LibsndfileError is a RuntimeError
            raise AudioError(f"cannot encode {self.dest}: {_sndfile_reason(exc)}") from None

    def write(self, chunk: np.ndarray) -> None:
        if chunk.ndim != 2 or chunk.shape[0] != self.channels:
            raise ValueError(f"expected ({self.channels}, n) samples, got {chunk.shape}")
        self._failing(lambda: self._file.write(np.ascontiguousarray(chunk.T, dtype="<f4")))

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        try:
            self._failing(self._file.close)  # flushes the last frames and the header
        except AudioError as err:
            if exc_type is None:
                stack.__exit__(type(err), err, err.__traceback__)
                raise
        return stack.__exit__(exc_type, exc, tb)


class Encoder:
    """Streaming encoder: ``with Encoder(dest, ...) as enc: enc.write(chunk)`` feeds float
    ``(channels, n)`` chunks to one ffmpeg process and, when the block ends without an
    exception, tags the file and renames it into place.

    ffmpeg writes to a temporary name beside ``dest`` (``fsutil.atomic_path``); on any
    failure (ffmpeg exits with an error, an exception inside the block, a failed tag)
    ffmpeg is killed, the temporary file removed, and nothing appears under ``dest``.

    Every file is measured as it is written, never decoded again: the sample peak, RMS and
    frame count of the chunks in Python (``peak``, ``rms``, ``frames``); with
    ``measure=True`` also the EBU R128 loudness (``loudness``: ffmpeg's ebur128 filter on a
    branch of the same ffmpeg's input, ``asplit``) and the ReplayGain tags from it and the
    sample peak; with ``digest=True`` the sha256, size and mtime of the finished, tagged
    file (``sha256``, ``size_bytes``, ``mtime_ns``: our own write, hashed before the
    rename, which keeps the mtime); with ``waveform=<color>``
    the waveform picture of the written audio (``waveform``: PNG bytes, drawn by the same
    ffmpeg). ``measurements()`` gathers them for a record."""

    def __init__(self, dest: Path, samplerate: int, channels: int, fmt: str,
                 bitrate: str = "256k", tags: "Tags | None" = None, *, measure: bool = False,
                 digest: bool = False, waveform: str | None = None):
        if fmt not in FORMATS:
            raise AudioError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
        ext, self._codec_args, self.codec = FORMATS[fmt]
        self.dest = Path(dest)
        if self.dest.suffix != ext:
            raise AudioError(f"{self.dest.name}: a {fmt} file must end in {ext}")
        self.samplerate, self.channels, self.fmt = samplerate, channels, fmt
        self.bitrate, self.tags = bitrate, tags
        self.measure, self.digest = measure, digest
        self.waveform_color = waveform
        self.loudness: dict | None = None  # measure=True: ``loudness`` of the written audio
        self.waveform: bytes | None = None  # waveform=<color>: the PNG
        self.frames = 0  # written so far
        self._levels = Levels()  # of what was written
        self.sha256: str | None = None  # digest=True: of the final (tagged) file
        self.size_bytes: int | None = None
        self.mtime_ns: int | None = None  # of the published file (after the rename)
        #: called with the temporary file once it is complete and tagged, before the rename
        #: (what must read the file, e.g. a mux, reads it before it is published)
        self.on_finished: Callable[[Path], None] | None = None
        self._stack: ExitStack | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._tmp: Path | None = None
        self._png: Path | None = None
        self._finished = False

    def _command(self) -> list[str]:
        bitrate_args = [] if self.fmt == "flac" else ["-b:a", self.bitrate]
        head = [tool_path("ffmpeg"), "-nostdin", "-hide_banner", "-nostats", "-y",
                "-loglevel", f"level+{'info' if self.measure else 'error'}",
                "-f", "f32le", "-ar", str(self.samplerate), "-ac", str(self.channels),
                "-i", "pipe:0"]
        if not self.measure and self.waveform_color is None:
            return [*head, *self._codec_args, *bitrate_args, str(self._tmp)]
        branches = ["enc"] + (["m"] if self.measure else []) + \
            (["w"] if self.waveform_color is not None else [])
        graph = [f"[0:a]asplit={len(branches)}" + "".join(f"[{b}]" for b in branches)]
        if self.measure:  # framelog=verbose: only the summary at the end is logged at info.
            # No true peak (peak=true, 4x oversampled): it cost about 12% of an AAC encode's
            # CPU, and ReplayGain 2.0 takes the sample peak, which ``write`` already has
            graph.append("[m]ebur128=framelog=verbose,anullsink")
        if self.waveform_color is not None:
            graph.append(f"[w]{waveform_filter(self.waveform_color)}[v]")
        cmd = [*head, "-filter_complex", ";".join(graph),
               "-map", "[enc]", *self._codec_args, *bitrate_args, str(self._tmp)]
        if self.waveform_color is not None:
            cmd += ["-map", "[v]", "-frames:v", "1", "-c:v", "png", "-f", "image2",
                    "-update", "1", str(self._png)]
        return cmd

    def __enter__(self) -> "Encoder":
        if self._stack is not None:
            raise RuntimeError("an Encoder is used once")
        with ExitStack() as stack:
            self._tmp = stack.enter_context(atomic_path(self.dest))
            self._stderr = stack.enter_context(tempfile.TemporaryFile())
            if self.waveform_color is not None:
                fd, png = tempfile.mkstemp(prefix="imaker-waveform-", suffix=".png")
                os.close(fd)
                self._png = Path(png)
                stack.callback(self._png.unlink, missing_ok=True)
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=self._stderr, bufsize=0)
            stack.callback(self._proc.stdin.close)  # unbuffered: closing never flushes
            stack.callback(_reap, self._proc)  # runs first
            self._stack = stack.pop_all()
        return self

    def _log(self) -> bytes:
        self._stderr.seek(0)
        return self._stderr.read()

    def _failed(self) -> AudioError:
        _reap(self._proc)
        why = write_failure(self._proc.returncode, error_lines(self._log())) or "no message"
        return AudioError(f"cannot encode {self.dest}: {why}")

    def write(self, chunk: np.ndarray) -> None:
        """Append float ``(channels, n)`` samples (any float dtype; sent as float32)."""
        if self._proc is None or self._proc.stdin.closed:
            raise RuntimeError("Encoder.write outside its with block or after finish")
        if chunk.ndim != 2 or chunk.shape[0] != self.channels:
            raise ValueError(f"expected ({self.channels}, n) samples, got {chunk.shape}")
        samples = np.ascontiguousarray(chunk.T, dtype="<f4")
        data = memoryview(samples).cast("B")
        try:
            while data:  # an unbuffered pipe write may be partial
                data = data[self._proc.stdin.write(data):]
        except BrokenPipeError:  # ffmpeg exited: report its message
            raise self._failed() from None
        self._levels.add(samples)  # the levels of exactly what ffmpeg was sent
        self.frames += chunk.shape[1]

    @property
    def peak(self) -> float:
        """Sample peak of the written samples (linear)."""
        return self._levels.peak

    @property
    def rms(self) -> float:
        """RMS of the written samples (linear, every channel)."""
        return self._levels.rms

    def finish(self) -> None:
        """End the input, wait for ffmpeg and tag the temporary file; the rename into place
        comes when the ``with`` block ends. Called by the block's end when not before (call
        it first for several encoders so that none is published when one fails)."""
        if self._finished:
            return
        if self._proc is None:
            raise RuntimeError("Encoder.finish outside its with block")
        self._proc.stdin.close()
        self._proc.wait()
        log = self._log()
        if write_failure(self._proc.returncode, error_lines(log)) is not None:
            raise self._failed()
        if self.waveform_color is not None:
            png = self._png.read_bytes()
            if not png.startswith(b"\x89PNG"):
                raise AudioError(f"cannot draw the waveform of {self.dest.name}")
            self.waveform = png
        if self.measure:
            # ReplayGain describes the PCM that was encoded, measured on its way into the
            # encoder (no second decode): AAC at 256k moves the integrated loudness by far
            # less than 0.1 LU; its peak can come out a little higher than the PCM's (lossy
            # codecs overshoot, most at abrupt onsets), which is why the clipping check
            # decodes the published file rather than trusting these numbers
            self.loudness = parse_ebur128(log.decode("utf-8", "replace"))
            if self.loudness["integrated_lufs"] is None:
                raise AudioError(f"cannot measure the loudness of {self.dest.name}: "
                                 f"{stderr_tail(log)}")
            if self.tags is not None:
                self.tags.replaygain = replaygain(self.loudness["integrated_lufs"], self.peak)
        if self.tags is not None:
            self.tags.write(self._tmp, self.fmt)
        if self.digest:  # the file as published: our own write, hashed before the rename
            digest = hashlib.sha256()
            with open(self._tmp, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
            self.sha256 = digest.hexdigest()
            self.size_bytes = self._tmp.stat().st_size
        if self.on_finished is not None:
            self.on_finished(self._tmp)
        self._finished = True

    def measurements(self) -> dict:
        """What the encoding measured, for a record (``variants.json``, ``source.json``):
        duration (written frames / rate), sample peak and RMS in dBFS, the format, and with
        ``measure=True`` the loudness, with ``digest=True`` the sha256, size
        and mtime of the file."""
        out = {"duration_s": round(self.frames / self.samplerate, 4), "frames": self.frames,
               "sample_rate": self.samplerate, "channels": self.channels, "codec": self.codec,
               "peak_dbfs": dbfs(self.peak), "rms_dbfs": dbfs(self.rms)}
        if self.loudness is not None:
            out.update({"loudness_lufs": self.loudness["integrated_lufs"],
                        "loudness_range_lu": self.loudness["loudness_range_lu"]})
        if self.sha256 is not None:
            out.update({"sha256": self.sha256, "size_bytes": self.size_bytes,
                        "mtime_ns": self.mtime_ns})
        return out

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        if exc_type is None:
            try:
                self.finish()
            except BaseException as err:
                if not stack.__exit__(type(err), err, err.__traceback__):
                    raise
                return False
        suppressed = stack.__exit__(exc_type, exc, tb)
        if exc_type is None and self.digest:
            # the rename keeps the mtime: with the size, what the manifest check trusts
            self.mtime_ns = self.dest.stat().st_mtime_ns
        return suppressed


def encode(audio: np.ndarray, samplerate: int, dest: Path, fmt: str, bitrate: str = "256k",
           tags: "Tags | None" = None, **measuring) -> "Encoder":
    """Encode float ``(channels, samples)`` to ``dest`` in format ``fmt`` and tag it;
    returns the finished ``Encoder`` (its measurements: ``measuring`` takes its
    ``measure``/``digest``/``waveform`` options).

    Written to a temporary name and renamed into place after tagging: a crash never
    leaves a half-written file under the final name. Sent to ffmpeg in chunks (no
    whole-track PCM copy)."""
    with Encoder(dest, samplerate, audio.shape[0], fmt, bitrate, tags, **measuring) as enc:
        for start in range(0, audio.shape[1], CHUNK_FRAMES):
            enc.write(audio[:, start:start + CHUNK_FRAMES])
    return enc


def extension(fmt: str) -> str:
    return FORMATS[fmt][0]


def cover_mime(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


#: tags copied from the input onto every output (mutagen's "easy" names, the same in every
#: format; see ``read_tags``). Lyrics and comments are not copied.
COPIED_TAGS = ("albumartist", "genre", "date", "tracknumber", "discnumber", "composer",
               "musicbrainz_trackid", "musicbrainz_releasetrackid", "musicbrainz_albumid",
               "musicbrainz_artistid", "musicbrainz_albumartistid",
               "musicbrainz_releasegroupid")
_MAX_TAG_VALUES, _MAX_TAG_CHARS = 8, 500
#: ReplayGain 2.0's reference loudness (-18 LUFS, EBU R128 measurement)
REPLAYGAIN_REFERENCE_LUFS = -18.0


def _easy_mp4_keys() -> None:
    """Give mutagen's EasyMP4 the keys MusicBrainz Picard writes that it lacks (mutagen's
    own extension mechanism)."""
    from mutagen.easymp4 import EasyMP4Tags

    if "composer" not in EasyMP4Tags.Get:
        EasyMP4Tags.RegisterTextKey("composer", "\xa9wrt")
        EasyMP4Tags.RegisterFreeformKey("musicbrainz_releasegroupid",
                                        "MusicBrainz Release Group Id")
        EasyMP4Tags.RegisterFreeformKey("musicbrainz_releasetrackid",
                                        "MusicBrainz Release Track Id")


@dataclass
class FileTags:
    """What an input file's tags say (``read_tags``); a piece it lacks is None."""

    artist: str | None = None
    album: str | None = None
    title: str | None = None
    cover: bytes | None = None
    cover_mime: str | None = None
    #: the ``COPIED_TAGS`` it carries, ``{name: [values]}``, bounded in number and length
    copied: dict[str, list[str]] = field(default_factory=dict)

    @property
    def cover_ext(self) -> str | None:
        return {"image/jpeg": ".jpg", "image/png": ".png"}.get(self.cover_mime or "")


def _tag_values(tags, key: str) -> list[str]:
    try:
        values = tags.get(key)
    except (KeyError, ValueError):
        values = None
    if isinstance(values, str):
        values = [values]
    return [str(v).strip() for v in (values or []) if str(v).strip()]


def read_tags(path: Path) -> FileTags:
    """The tags of an input file in any format mutagen reads (MP4/M4A, MP3, FLAC, Ogg
    Vorbis/Opus...): artist (else album artist), album, title, the front cover, and the
    ``COPIED_TAGS``. An untagged, unknown or damaged file gives what could be read, at
    worst an empty FileTags (a missing tag never fails a track or an import; the audio is
    checked elsewhere)."""
    import mutagen

    _easy_mp4_keys()
    out = FileTags()
    try:
        easy = mutagen.File(path, easy=True)
    except Exception:  # noqa: BLE001 - unreadable tags are no tags
        easy = None
    if easy is not None and easy.tags is not None:
        first = {key: (_tag_values(easy.tags, key) or [None])[0]
                 for key in ("artist", "albumartist", "album", "title")}
        out.artist = first["artist"] or first["albumartist"]
        out.album, out.title = first["album"], first["title"]
        for key in COPIED_TAGS:
            values = [v[:_MAX_TAG_CHARS] for v in _tag_values(easy.tags, key)]
            if values:
                out.copied[key] = values[:_MAX_TAG_VALUES]
    try:
        full = mutagen.File(path)
    except Exception:  # noqa: BLE001
        full = None
    data = None
    tags = getattr(full, "tags", None)
    pictures = getattr(full, "pictures", None)  # FLAC
    if pictures:
        front = [p for p in pictures if p.type == 3] or list(pictures)
        data = front[0].data
    elif tags is not None and hasattr(tags, "getall"):  # ID3
        apic = tags.getall("APIC")
        if apic:
            front = [p for p in apic if p.type == 3] or apic
            data = front[0].data
    elif tags is not None and "covr" in tags:  # MP4
        covers = tags["covr"]
        data = bytes(covers[0]) if covers else None
    if data:
        mime = cover_mime(bytes(data))
        if mime:
            out.cover, out.cover_mime = bytes(data), mime
    return out


def replaygain(lufs: float | None, peak: float) -> dict | None:
    """ReplayGain 2.0 track values from the EBU R128 integrated loudness ``lufs`` and the
    sample peak ``peak`` (linear; the specification allows the sample or the true peak):
    gain to -18 LUFS in dB and the peak; None for silence."""
    if lufs is None or not np.isfinite(lufs) or lufs <= -70.0:
        return None
    return {"gain_db": round(REPLAYGAIN_REFERENCE_LUFS - lufs, 2), "peak": round(float(peak), 6)}


class Tags:
    """Tags of one output, written with mutagen for m4a, mp3 and flac (and the mp4 video):
    title (marking the version), artist, album, album artist, the input's ``COPIED_TAGS``,
    cover, ReplayGain 2.0 track gain/peak, and our job id and variant."""

    def __init__(self, artist: str, title: str, album: str | None = None,
                 cover: Path | None = None, job_id: str | None = None,
                 variant: str | None = None, album_artist: str | None = None,
                 copied: dict[str, list[str]] | None = None):
        self.artist, self.title, self.album = artist, title, album
        self.job_id, self.variant = job_id, variant
        self.copied = {k: list(v) for k, v in (copied or {}).items() if k in COPIED_TAGS and v}
        self.album_artist = album_artist or (self.copied.pop("albumartist", [None])[0]) or artist
        self.copied.pop("albumartist", None)
        self.replaygain: dict | None = None  # {"gain_db", "peak"}: set by Encoder(measure=True)
        self.cover_data: bytes | None = None
        self.cover_mime: str | None = None
        if cover is not None:
            data = Path(cover).read_bytes()[: MAX_COVER_BYTES + 1]
            mime = cover_mime(data)
            if mime and len(data) <= MAX_COVER_BYTES:
                self.cover_data, self.cover_mime = data, mime

    def text(self) -> dict[str, list[str]]:
        """The text tags by mutagen's easy names."""
        out = {"artist": [self.artist], "title": [self.title], "albumartist": [self.album_artist]}
        if self.album:
            out["album"] = [self.album]
        out.update(self.copied)
        return out

    def _custom(self) -> dict[str, str]:
        out = {}
        if self.job_id:
            out["IMAKER_JOB_ID"] = self.job_id
        if self.variant:
            out["IMAKER_VARIANT"] = self.variant
        if self.replaygain:
            out["REPLAYGAIN_TRACK_GAIN"] = f"{self.replaygain['gain_db']:+.2f} dB"
            out["REPLAYGAIN_TRACK_PEAK"] = f"{self.replaygain['peak']:.6f}"
        return out

    def write(self, path: Path, fmt: str) -> None:
        import mutagen

        _easy_mp4_keys()
        path = Path(path)
        media = mutagen.File(path, easy=True)  # the easy names, in every format
        if media is None:
            raise AudioError(f"cannot tag {path}: unknown file type")
        if media.tags is None:
            media.add_tags()
        for key, values in self.text().items():
            media.tags[key.upper() if fmt == "flac" else key] = values
        media.save()
        getattr(self, f"_write_{'m4a' if fmt == 'mp4' else fmt}")(path)

    def _write_m4a(self, path: Path) -> None:
        from mutagen.mp4 import MP4, MP4Cover, MP4FreeForm

        audio = MP4(path)
        tags = audio.tags
        if self.cover_data:
            fmt = MP4Cover.FORMAT_PNG if self.cover_mime == "image/png" else MP4Cover.FORMAT_JPEG
            tags["covr"] = [MP4Cover(self.cover_data, imageformat=fmt)]
        for key, value in self._custom().items():
            # ReplayGain in MP4 by the foobar2000/TagLib convention: lower-case freeform keys
            name = key.lower() if key.startswith("REPLAYGAIN_") else key
            tags[f"----:com.apple.iTunes:{name}"] = [MP4FreeForm(value.encode("utf-8"))]
        audio.save()

    def _write_mp3(self, path: Path) -> None:
        from mutagen.id3 import APIC, ID3, TXXX

        tags = ID3(path)
        if self.cover_data:
            tags.add(APIC(encoding=3, mime=self.cover_mime, type=3, desc="Cover",
                          data=self.cover_data))
        for key, value in self._custom().items():
            tags.add(TXXX(encoding=3, desc=key, text=[value]))
        tags.save(path)

    def _write_flac(self, path: Path) -> None:
        from mutagen.flac import FLAC, Picture

        audio = FLAC(path)
        for key, value in self._custom().items():
            audio[key] = value
        if self.cover_data:
            pic = Picture()
            pic.type, pic.mime, pic.data = 3, self.cover_mime, self.cover_data
            audio.clear_pictures()
            audio.add_picture(pic)
        audio.save()
