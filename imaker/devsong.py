"""Songs with known stems, composed from a seed and rendered with a General MIDI soundfont.

For tests and benchmarks (issue 22): real separation models are judged on music, not noise,
and an oracle needs the true stems. ``write_song(folder, seed, seconds)`` composes a song in
MIDI — drums (GM percussion, channel 10), bass, chords + a lead/arpeggio ("other") and a
sung-line stand-in (choir / voice patch, "vocals") — in sections (verse, chorus, bridge)
repeated for any length, renders each stem separately with FluidSynth and the soundfont
pretty-midi's wheel ships (``TimGM6mb.sf2``), and writes the MUSDB18-HQ layout::

    folder/mixture.wav   the exact sum of the four stems as written
    folder/drums.wav  bass.wav  other.wav  vocals.wav
    folder/song.mid      the composed MIDI (for listening or other renderers)
    folder/song.json     seed, tempo, key, form, instruments, gain

WAVs are 44.1 kHz stereo 32-bit float. One common gain puts the mixture's peak (and every
stem's) at ``peak_db`` (−1 dBFS), so nothing clips. Each stem has its own stereo placement
(pan per channel, FluidSynth's stereo reverb and chorus). The same seed and arguments give
bit-identical files (FluidSynth renders single-threaded, in float, with no dither; the
composer draws from ``random.Random(seed)``'s ``random()`` only, whose sequence Python
keeps stable).

Needs ``pretty-midi`` and ``pyfluidsynth`` (the ``test`` extra) and the FluidSynth library
(Debian ``libfluidsynth3``). Nothing here imports Dagster.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import hashlib
import json
import math
import random
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

SOURCES = ("drums", "bass", "other", "vocals")  # MUSDB18 / demucs order
SAMPLE_RATE = 44100
GENERATOR_VERSION = 1  # bump when the same seed would compose or render differently

# General MIDI programs (0-based) the small soundfont has, per role
CHORD_PROGRAMS = (0, 4, 5, 16, 25, 48, 89)       # piano, e-pianos, organ, guitar, strings, pad
LEAD_PROGRAMS = (11, 24, 46, 73, 80)             # vibraphone, nylon guitar, harp, flute, square
BASS_PROGRAMS = (33, 34, 38)                     # fingered, picked, synth bass
VOICE_PROGRAMS = (52, 53, 54, 85)                # choir aahs, voice oohs, synth vox, solo vox
# GM percussion keys
KICK, SNARE, CLOSED_HAT, OPEN_HAT, CRASH, RIDE = 36, 38, 42, 46, 49, 51
LOW_TOM, MID_TOM, HIGH_TOM = 45, 47, 50

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
# chord progressions as 0-based scale degrees (one chord per bar)
PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 3), (0, 2, 3, 4),
                (0, 3, 0, 4), (3, 4, 0, 5), (0, 6, 5, 4))
NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
FORM = ("verse", "chorus", "verse", "chorus", "bridge", "chorus")  # repeated to any length
SECTION_BARS = {"verse": 8, "chorus": 8, "bridge": 4}


class DevSongError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# composition

class _Rng:
    """``random.Random(seed)`` used through ``random()`` only: the one method whose sequence
    Python promises to keep for a seed (``choice``/``randrange`` have changed before)."""

    def __init__(self, seed: int | str):
        self._r = random.Random(seed)

    def real(self) -> float:
        return self._r.random()

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def pick(self, seq: Sequence):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self._r.random() < p


@dataclass
class Note:
    start: float   # seconds
    end: float
    pitch: int
    velocity: int


@dataclass
class Part:
    """One MIDI channel's notes, rendered into stem ``stem``."""
    stem: str
    name: str
    program: int
    is_drum: bool
    channel: int   # FluidSynth channel within the stem's synth (9 = GM percussion)
    pan: int       # CC10, 0 (left) .. 127 (right)
    volume: int    # CC7
    reverb: int    # CC91
    chorus: int    # CC93
    notes: list[Note] = field(default_factory=list)


@dataclass
class Song:
    seed: int
    seconds: float
    tempo: float
    key: int
    mode: str
    sections: list[dict]
    parts: list[Part]

    def describe(self) -> dict:
        return {"seed": self.seed, "seconds": self.seconds, "tempo_bpm": self.tempo,
                "key": f"{NAMES[self.key]} {self.mode}", "sections": self.sections,
                "parts": [{"stem": p.stem, "name": p.name, "program": p.program,
                           "is_drum": p.is_drum, "pan": p.pan, "notes": len(p.notes)}
                          for p in self.parts]}


def _chord(scale: Sequence[int], key: int, degree: int) -> list[int]:
    """The triad on ``degree`` as pitch classes relative to C (root first)."""
    return [(key + scale[(degree + i) % 7] + 12 * ((degree + i) // 7)) % 12 for i in (0, 2, 4)]


def _nearest(pc: int, target: float, low: int, high: int) -> int:
    """The pitch of pitch class ``pc`` closest to ``target`` within [low, high]."""
    options = [p for p in range(low, high + 1) if p % 12 == pc]
    return min(options, key=lambda p: (abs(p - target), p))


def _section_material(rng: _Rng, kind: str) -> dict:
    """Everything a section of this kind plays, drawn once and reused on every repeat."""
    prog = rng.pick(PROGRESSIONS)
    busy = kind == "chorus"
    kicks = {0, 8} | {s for s in (3, 6, 10, 11, 14) if rng.chance(0.35 if busy else 0.25)}
    hats = list(range(0, 16, 1 if busy and rng.chance(0.5) else 2))
    bass_rhythm = rng.pick(((0, 4, 8, 12), (0, 6, 8, 14), (0, 2, 4, 6, 8, 10, 12, 14),
                            (0, 3, 6, 8, 11, 14), (0, 8, 10, 14)))
    comp = rng.pick((((0, 16),), ((0, 8), (8, 8)), ((0, 6), (6, 6), (12, 4)),
                     ((0, 3), (4, 3), (8, 3), (12, 3)), ((2, 2), (6, 2), (10, 2), (14, 2))))
    if kind == "verse" and rng.chance(0.5):
        comp = ((0, 16),)
    # melody: two 2-bar phrases (a, b) of (step, length) pairs over 16th steps
    phrases = []
    for _ in range(2):
        bars = []
        for bar in range(2):
            rhythm = rng.pick((
                ((0, 4), (4, 2), (6, 2), (8, 6)),
                ((0, 2), (2, 2), (4, 4), (8, 2), (10, 2), (12, 4)),
                ((2, 2), (4, 2), (6, 4), (10, 6)),
                ((0, 6), (6, 2), (8, 8)),
                ((0, 3), (3, 3), (6, 2), (8, 4), (12, 2)),
            ) if bar == 0 else (
                ((0, 4), (4, 4), (8, 8)),
                ((0, 2), (2, 2), (4, 8)),
                ((0, 6), (6, 6)),
                ((0, 3), (3, 3), (6, 10)),
            ))
            bars.append([(step, length, rng.real()) for step, length in rhythm])
        phrases.append(bars)
    return {"progression": prog, "kicks": sorted(kicks), "hats": hats,
            "open_hat": busy and rng.chance(0.6), "ride": kind == "bridge",
            "bass_rhythm": bass_rhythm, "bass_fifths": rng.chance(0.5), "comp": comp,
            "arp": kind != "verse" or rng.chance(0.3), "arp_rate": rng.pick((2, 4)),
            "phrases": phrases, "register": 67 if kind == "chorus" else 62}


def compose(seed: int = 0, seconds: float = 30.0) -> Song:
    """A song of ``seconds`` (verse, chorus, verse, chorus, bridge, chorus, repeated and cut
    at ``seconds``), every choice drawn from ``seed``."""
    if seconds <= 0:
        raise DevSongError(f"seconds must be positive, not {seconds}")
    rng = _Rng(f"imaker-devsong:{GENERATOR_VERSION}:{seed}")
    tempo = float(84 + 4 * rng.below(12))  # 84 .. 128 bpm
    key = rng.below(12)
    mode = "major" if rng.chance(0.6) else "minor"
    scale = MAJOR if mode == "major" else MINOR
    step_s = 60.0 / tempo / 4  # one 16th
    bar_s = 16 * step_s
    material = {kind: _section_material(_Rng(f"{seed}:{kind}:{rng.real()}"), kind)
                for kind in SECTION_BARS}

    def vel(base: int, spread: int = 10) -> int:  # a little human variation
        return max(1, min(127, base + int((rng.real() - .5) * spread)))

    drums = Part("drums", "kit", 0, True, 9, 64, 110, 30, 0)
    cymbals = Part("drums", "cymbals", 0, True, 10, 88, 92, 45, 0)
    bass = Part("bass", "bass", rng.pick(BASS_PROGRAMS), False, 0, 58, 110, 12, 0)
    chords = Part("other", "chords", rng.pick(CHORD_PROGRAMS), False, 0, 38, 88, 55, 40)
    lead = Part("other", "lead", rng.pick(LEAD_PROGRAMS), False, 1, 92, 80, 60, 30)
    voice = Part("vocals", "voice", rng.pick(VOICE_PROGRAMS), False, 0, 70, 115, 70, 20)
    parts = [drums, cymbals, bass, chords, lead, voice]

    sections: list[dict] = []
    bar = 0
    form_i = 0
    total_bars = math.ceil(seconds / bar_s)
    voicing: list[int] = [60, 64, 67]
    melody_pitch = 64
    while bar < total_bars:
        kind = FORM[form_i % len(FORM)]
        form_i += 1
        m = material[kind]
        n_bars = SECTION_BARS[kind]
        sections.append({"kind": kind, "start_s": round(bar * bar_s, 6), "bars": n_bars})
        for b in range(n_bars):
            t0 = (bar + b) * bar_s
            if t0 >= seconds:
                break
            degree = m["progression"][b % 4]
            triad = _chord(scale, key, degree)
            # drums: pattern, crash on a section's first bar, a fill on its last
            fill = b == n_bars - 1 and n_bars > 1
            for s in m["kicks"]:
                if not (fill and s >= 12):
                    drums.notes.append(Note(t0 + s * step_s, t0 + (s + 1) * step_s, KICK,
                                            vel(108 if s in (0, 8) else 90)))
            for s in (4, 12):
                drums.notes.append(Note(t0 + s * step_s, t0 + (s + 1) * step_s, SNARE, vel(104)))
            if fill:
                for s, key_ in zip(range(12, 16), (SNARE, HIGH_TOM, MID_TOM, LOW_TOM)):
                    drums.notes.append(Note(t0 + s * step_s, t0 + (s + 1) * step_s, key_,
                                            vel(96)))
            if b == 0:
                cymbals.notes.append(Note(t0, t0 + 8 * step_s, CRASH, vel(100)))
            for s in m["hats"]:
                if (b == 0 and s == 0) or (fill and s >= 12):
                    continue
                if m["ride"]:
                    k = RIDE
                elif m["open_hat"] and s == 14:
                    k = OPEN_HAT
                else:
                    k = CLOSED_HAT
                cymbals.notes.append(Note(t0 + s * step_s, t0 + (s + 1) * step_s, k,
                                          vel(84 if s % 4 == 0 else 66)))
            # bass: the chord's root (and fifth) in octave 2-3
            root = _nearest(triad[0], 40, 28, 51)
            rhythm = m["bass_rhythm"]
            for i, s in enumerate(rhythm):
                end = rhythm[i + 1] if i + 1 < len(rhythm) else 16
                pitch = root + 7 if m["bass_fifths"] and i % 4 == 2 and root + 7 <= 55 else root
                bass.notes.append(Note(t0 + s * step_s, t0 + (end - 0.3) * step_s, pitch,
                                       vel(100 if s % 8 == 0 else 86)))
            # chords: a voicing near the previous one (smooth voice leading)
            center = sum(voicing) / 3
            voicing = sorted(_nearest(pc, center + d, 52, 76) for pc, d in zip(triad, (-4, 0, 4)))
            for s, length in m["comp"]:
                for p in voicing:
                    chords.notes.append(Note(t0 + s * step_s, t0 + (s + length - 0.2) * step_s,
                                             p, vel(76)))
            # lead: an arpeggio of the chord an octave up
            if m["arp"]:
                tones = sorted(_nearest(pc, 76, 69, 86) for pc in triad)
                tones = tones + [tones[1], tones[0] + 12 if tones[0] + 12 <= 88 else tones[2]]
                for i, s in enumerate(range(0, 16, m["arp_rate"])):
                    lead.notes.append(Note(t0 + s * step_s,
                                           t0 + (s + m["arp_rate"] - 0.3) * step_s,
                                           tones[i % len(tones)], vel(70)))
            # vocals: phrase a on bars 0-1 (and 4-5), b on 2-3 (and 6-7)
            phrase = m["phrases"][(b // 2) % 2]
            scale_pitches = [p for p in range(55, 82)
                             if (p - key) % 12 in scale]
            for i, (s, length, r) in enumerate(phrase[b % 2]):
                if i == 0 or s % 8 == 0:  # strong beats: a chord tone near the register
                    target = (melody_pitch + m["register"]) / 2 + (r - 0.5) * 6
                    pitch = _nearest(triad[int(r * 3) % 3], target, 57, 79)
                else:  # a step or two along the scale
                    j = min(range(len(scale_pitches)),
                            key=lambda k: abs(scale_pitches[k] - melody_pitch))
                    j = max(0, min(len(scale_pitches) - 1, j + (-2, -1, 1, 2)[int(r * 4) % 4]))
                    pitch = scale_pitches[j]
                melody_pitch = pitch
                voice.notes.append(Note(t0 + s * step_s, t0 + (s + length - 0.4) * step_s,
                                        pitch, vel(96 if s % 8 == 0 else 86)))
        bar += n_bars
    for part in parts:  # nothing starts after the end; notes are cut there
        part.notes = [Note(n.start, min(n.end, seconds), n.pitch, n.velocity)
                      for n in part.notes if n.start < seconds - 0.01]
    return Song(seed, float(seconds), tempo, key, mode, sections, parts)


# ---------------------------------------------------------------------------------------
# rendering

def _quietly_import(name: str):
    """Import ``pretty_midi`` or ``fluidsynth``: pyfluidsynth (which pretty_midi imports)
    prints where it found the library when CI is set in the environment."""
    import importlib

    with contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module(name)


def soundfont_path() -> Path:
    """pretty-midi's General MIDI soundfont (TimGM6mb, 6 MB)."""
    try:
        pretty_midi = _quietly_import("pretty_midi")
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise DevSongError("dev songs need pretty-midi (pip install -e '.[test]')") from exc
    path = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    if not path.is_file():  # pragma: no cover
        raise DevSongError(f"pretty-midi's soundfont is missing: {path}")
    return path


# FluidSynth initialises its global tables (conversion tables, default modulators) in the
# first new_fluid_synth() of a process, behind a flag that is set *before* the tables are
# filled: a synth created meanwhile in another thread renders with half-made tables (seen:
# a stem twice as loud, now and then, with workers=4). Synths are therefore created and set
# up under this lock; they render in parallel afterwards.
_SETUP_LOCK = threading.Lock()
_FLUID = None


def _fluidsynth():
    global _FLUID
    with _SETUP_LOCK:
        if _FLUID is None:
            _FLUID = _load_fluidsynth()
        return _FLUID


def _load_fluidsynth():
    try:
        fluidsynth = _quietly_import("fluidsynth")
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise DevSongError("dev songs need pyfluidsynth and the FluidSynth library "
                           "(Debian: libfluidsynth3; scripts/setup.sh --test)") from exc
    fn = fluidsynth._fl.fluid_synth_write_float
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    # FluidSynth's own messages (e.g. "no preset" warnings) are not ours to print
    set_log = fluidsynth._fl.fluid_set_log_function
    set_log.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    for level in range(5):
        set_log(level, None, None)
    return fluidsynth, fn


def render_stem(parts: Sequence[Part], seconds: float, soundfont: Path | None = None,
                samplerate: int = SAMPLE_RATE) -> np.ndarray:
    """Render ``parts`` (the channels of one stem) with one FluidSynth instance: float32
    array of shape (round(seconds * samplerate), 2), sample-accurate note timing."""
    fluidsynth, write_float = _fluidsynth()
    n = int(round(seconds * samplerate))
    out = np.zeros((n, 2), dtype=np.float32)
    sf2 = str(soundfont or soundfont_path())
    with _SETUP_LOCK:
        synth = fluidsynth.Synth(gain=0.2, samplerate=float(samplerate), channels=16,
                                 **{"synth.cpu-cores": 1, "synth.reverb.active": 1,
                                    "synth.chorus.active": 1, "synth.polyphony": 256})
        sfid = synth.sfload(sf2)
        for part in parts:
            if sfid < 0:
                break
            synth.program_select(part.channel, sfid, 128 if part.is_drum else 0,
                                 0 if part.is_drum else part.program)
            for cc, value in ((7, part.volume), (10, part.pan), (91, part.reverb),
                              (93, part.chorus)):
                synth.cc(part.channel, cc, value)
    try:
        if sfid < 0:
            raise DevSongError(f"FluidSynth cannot load {sf2}")
        events: list[tuple[int, int, int, int, int, int]] = []  # sample, order, kind, ch, a, b
        for part in parts:
            for note in part.notes:
                on = int(round(note.start * samplerate))
                off = max(on + 1, int(round(note.end * samplerate)))
                # at one instant: note-offs before note-ons (a repeated pitch restarts)
                events.append((on, 1, 1, part.channel, note.pitch, note.velocity))
                events.append((off, 0, 0, part.channel, note.pitch, 0))
        events.sort()
        base = out.ctypes.data
        pos = 0
        for sample, _, kind, ch, pitch, velocity in events:
            sample = min(sample, n)
            if sample > pos:
                ptr = base + pos * 8
                write_float(synth.synth, sample - pos, ptr, 0, 2, ptr, 1, 2)
                pos = sample
            if kind:
                synth.noteon(ch, pitch, velocity)
            else:
                synth.noteoff(ch, pitch)
        if n > pos:
            ptr = base + pos * 8
            write_float(synth.synth, n - pos, ptr, 0, 2, ptr, 1, 2)
    finally:
        synth.delete()
    return out


# ---------------------------------------------------------------------------------------
# WAV files (32-bit float; Python's wave module writes integer PCM only)

def write_wav(path: Path, audio: np.ndarray, samplerate: int = SAMPLE_RATE) -> None:
    """Write a (frames, channels) float32 array as an IEEE-float WAV (format 3 + fact)."""
    data = np.ascontiguousarray(audio, dtype="<f4")
    frames, channels = data.shape
    size = data.nbytes
    header = (b"RIFF" + struct.pack("<I", 4 + 26 + 12 + 8 + size) + b"WAVE"
              + b"fmt " + struct.pack("<IHHIIHHH", 18, 3, channels, samplerate,
                                      samplerate * channels * 4, channels * 4, 32, 0)
              + b"fact" + struct.pack("<II", 4, frames)
              + b"data" + struct.pack("<I", size))
    tmp = Path(path).with_name(Path(path).name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(header)
        data.tofile(fh)
    tmp.replace(path)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a float32 (format 3) or 16/24/32-bit PCM WAV: (float32 (frames, channels), rate)."""
    raw = Path(path).read_bytes()
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise DevSongError(f"{path}: not a WAV file")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        body = raw[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise DevSongError(f"{path}: no fmt or data chunk")
    tag, channels, rate, _, _, bits = fmt
    if tag == 3 and bits == 32:
        audio = np.frombuffer(data, "<f4")
    elif tag == 1 and bits == 16:
        audio = np.frombuffer(data, "<i2").astype(np.float32) / 32768
    elif tag == 1 and bits == 24:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
        audio = ints.astype(np.float32) / 2 ** 23
    elif tag == 1 and bits == 32:
        audio = (np.frombuffer(data, "<i4") / 2 ** 31).astype(np.float32)
    else:
        raise DevSongError(f"{path}: unsupported WAV format {tag}/{bits} bit")
    return audio.reshape(-1, channels), rate


# ---------------------------------------------------------------------------------------
# songs on disk

_CHUNK = 1 << 16  # frames per block when summing (float64 only one block at a time)


def _sum_f32(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The element-wise sum of float32 arrays, computed in float64, rounded once to float32."""
    out = np.empty_like(arrays[0])
    for i in range(0, len(out), _CHUNK):
        acc = arrays[0][i:i + _CHUNK].astype(np.float64)
        for a in arrays[1:]:
            acc += a[i:i + _CHUNK]
        out[i:i + _CHUNK] = acc
    return out


def _peak_of_sum(arrays: Sequence[np.ndarray]) -> float:
    peak = 0.0
    for i in range(0, len(arrays[0]), _CHUNK):
        acc = arrays[0][i:i + _CHUNK].astype(np.float64)
        for a in arrays[1:]:
            acc += a[i:i + _CHUNK]
        peak = max(peak, float(np.max(np.abs(acc))))
    return peak


def write_song(folder: Path, seed: int = 0, seconds: float = 30.0, *,
               soundfont: Path | None = None, peak_db: float = -1.0,
               samplerate: int = SAMPLE_RATE, workers: int = 1) -> dict:
    """Compose, render and write one song into ``folder`` (created; files in it replaced).
    Returns what song.json holds (+ ``"folder"``). ``workers`` > 1 renders the stems in
    threads (FluidSynth runs outside the GIL; each stem is still rendered the same way)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sf2 = Path(soundfont) if soundfont else soundfont_path()
    song = compose(seed, seconds)
    by_stem = {s: [p for p in song.parts if p.stem == s] for s in SOURCES}
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(SOURCES))) as pool:
            rendered = dict(zip(SOURCES, pool.map(
                lambda s: render_stem(by_stem[s], seconds, sf2, samplerate), SOURCES)))
    else:
        rendered = {s: render_stem(by_stem[s], seconds, sf2, samplerate) for s in SOURCES}
    n = next(iter(rendered.values())).shape[0]
    k = min(n, int(min(2.0, seconds / 10) * samplerate))  # a fade-out, the same on every stem
    if k > 1:
        # smoothstep, not a cosine: plain arithmetic rounds the same on every CPU (numpy's
        # SIMD cos may differ in the last bit between machines)
        t = np.linspace(1.0, 0.0, k)
        ramp = (t * t * (3 - 2 * t)).astype(np.float32)[:, None]
        for a in rendered.values():
            a[n - k:] *= ramp
    peak = max([_peak_of_sum(list(rendered.values()))] +
               [float(np.max(np.abs(a))) for a in rendered.values()])
    if peak <= 0:
        raise DevSongError(f"seed {seed}: the rendered song is silent")
    gain = 10 ** (peak_db / 20) / peak
    for a in rendered.values():
        a *= np.float32(gain)
    stems = rendered
    # the mixture is the sum of the stems *as written* (float32), rounded once
    mixture = _sum_f32(list(stems.values()))
    for s, a in stems.items():
        write_wav(folder / f"{s}.wav", a, samplerate)
    write_wav(folder / "mixture.wav", mixture, samplerate)
    _write_midi(song, folder / "song.mid")
    info = dict(song.describe(), generator_version=GENERATOR_VERSION, samplerate=samplerate,
                frames=n, gain_db=round(20 * math.log10(gain), 4), peak_db=peak_db,
                soundfont=sf2.name, soundfont_sha256=_sha256(sf2),
                files=["mixture.wav", *(f"{s}.wav" for s in SOURCES), "song.mid"])
    (folder / "song.json").write_text(json.dumps(info, indent=2) + "\n")
    return dict(info, folder=str(folder))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA_CACHE[key]


def _write_midi(song: Song, path: Path) -> None:
    pretty_midi = _quietly_import("pretty_midi")

    pm = pretty_midi.PrettyMIDI(initial_tempo=song.tempo)
    for part in song.parts:
        inst = pretty_midi.Instrument(program=part.program, is_drum=part.is_drum,
                                      name=f"{part.stem}:{part.name}")
        inst.notes = [pretty_midi.Note(velocity=n.velocity, pitch=n.pitch, start=n.start,
                                       end=n.end) for n in part.notes]
        inst.control_changes = [pretty_midi.ControlChange(cc, v, 0.0) for cc, v in
                                ((7, part.volume), (10, part.pan), (91, part.reverb),
                                 (93, part.chorus))]
        pm.instruments.append(inst)
    tmp = path.with_name(path.name + ".part")
    pm.write(str(tmp))
    tmp.replace(path)


def song_name(seed: int, prefix: str = "devsong") -> str:
    return f"{prefix}_{seed:04d}"


def generate(out_dir: Path, *, count: int = 1, seed: int = 0, seconds: float = 30.0,
             prefix: str = "devsong", soundfont: Path | None = None, workers: int = 1,
             processes: int = 1) -> list[Path]:
    """``count`` songs with seeds ``seed`` .. ``seed + count - 1`` as
    ``out_dir/<prefix>_<seed>/`` (MUSDB18-HQ layout), ``processes`` songs at a time (each
    rendering ``workers`` stems at a time). Returns the song folders."""
    folders = [Path(out_dir) / song_name(s, prefix) for s in range(seed, seed + count)]
    if processes > 1 and count > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: the caller may hold threads (a Dagster run, a test session)
        with ProcessPoolExecutor(min(processes, count),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(write_song, f, s, seconds, soundfont=soundfont,
                                   workers=workers)
                       for f, s in zip(folders, range(seed, seed + count))]
            for fut in futures:
                fut.result()
    else:
        for f, s in zip(folders, range(seed, seed + count)):
            write_song(f, s, seconds, soundfont=soundfont, workers=workers)
    return folders


_CODECS = {".flac": ["-c:a", "flac"], ".m4a": ["-c:a", "aac", "-b:a", "256k"],
           ".wav": ["-c:a", "pcm_f32le"]}


def encode_mixture(song_dir: Path, dest: Path) -> Path:
    """Encode a generated song's mixture.wav with ffmpeg, the format from ``dest``'s suffix:
    ``.flac`` (lossless, 24 bit), ``.m4a`` (AAC 256k) or ``.wav`` (float)."""
    dest = Path(dest)
    if dest.suffix not in _CODECS:
        raise DevSongError(f"{dest.name}: the format must be one of {', '.join(_CODECS)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i",
                           str(Path(song_dir) / "mixture.wav"), *_CODECS[dest.suffix], str(dest)],
                          capture_output=True)
    if proc.returncode != 0:
        raise DevSongError(f"ffmpeg could not encode {Path(song_dir) / 'mixture.wav'}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    return dest


def queue_song(song_dir: Path, queue_dir: Path, *, job_id: str | None = None,
               fmt: str = "flac", title: str | None = None, artist: str = "imaker dev-song",
               **fields) -> Path:
    """Queue a generated song's mixture as a job bundle (through the retrievers' one
    ``BundleWriter``): ``audio.<fmt>`` (``flac``, ``m4a`` or ``wav``; ``encode_mixture``). The
    job.json names the song's folder and seed under ``devsong``; extra ``fields`` go into it
    too. Returns the bundle folder."""
    from .retrievers.writer import BundleWriter

    song_dir = Path(song_dir)
    job_id = job_id or song_dir.name
    meta = json.loads((song_dir / "song.json").read_text())
    with tempfile.TemporaryDirectory(prefix="imaker-devsong-") as work:
        tmp = encode_mixture(song_dir, Path(work) / f"audio.{fmt}")
        # where the known stems are (an oracle separation or a quality check can find them)
        job = {"schema_version": 1, "job_id": job_id, "source_type": "local",
               "title": title or song_dir.name, "artist": artist, "audio": tmp.name,
               "devsong": {"folder": str(song_dir.resolve()), "seed": meta["seed"],
                           "seconds": meta["seconds"],
                           "generator_version": meta["generator_version"]},
               **fields}
        return BundleWriter().write(queue_dir, job, {tmp.name: tmp}, move=True)


__all__ = ["DevSongError", "Note", "Part", "SAMPLE_RATE", "SOURCES", "Song", "compose",
           "encode_mixture", "generate", "queue_song", "read_wav", "render_stem",
           "soundfont_path", "song_name", "write_song", "write_wav"]
