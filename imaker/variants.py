"""The variant table: how each output is mixed from separated stems.

Adding a variant is one entry here; stems are mixed by inclusion/exclusion so that
4-stem and 6-stem demucs models both work.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from . import audio as audio_mod

#: Peak ceiling for every mixed variant (-1 dBFS). See ``gain_for``.
PEAK_CEILING = 10 ** (-1.0 / 20)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    label: str
    suffix: str  # appended to "Artist - Track" in the file name
    title_tag: str  # the title tag, marking the version for media libraries
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] | None = None  # None = every stem not excluded

    def tagged_title(self, title: str) -> str:
        return self.title_tag.format(title=title)

    @property
    def mentions(self) -> set[str]:
        """The stems this variant names (what a separation must give it)."""
        return set(self.include or ()) | set(self.exclude)

    def stems_for(self, available: list[str]) -> list[str]:
        chosen = [s for s in available
                  if (self.include is None or s in self.include) and s not in self.exclude]
        if not chosen:
            raise ValueError(f"variant {self.name!r} selects no stem out of {available}")
        return chosen


VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec("instrumental", "Instrumental", "", "{title} (Instrumental)",
                    exclude=("vocals",)),
        VariantSpec("no_drums", "Instrumental (no drum)", " (no drum)",
                    "{title} (Instrumental, no drums)", exclude=("vocals", "drums")),
        VariantSpec("drums_only", "Drums only", " (drums only)", "{title} (Drums only)",
                    include=("drums",)),
    )
}


def selected_variants(bundle_variants: list[str] | None, *, no_drums: bool,
                      drums_only: bool) -> list[str]:
    """Variants to produce for one track, in table order.

    ``instrumental`` always; ``no_drums``/``drums_only`` when their env toggle is on;
    plus whatever the bundle asks for (the bundle can add variants, not remove them).
    """
    wanted = {"instrumental"}
    if no_drums:
        wanted.add("no_drums")
    if drums_only:
        wanted.add("drums_only")
    wanted.update(bundle_variants or ())
    unknown = wanted - VARIANTS.keys()
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {sorted(VARIANTS)}")
    return [name for name in VARIANTS if name in wanted]


def gain_for(peak: float) -> float:
    """The anti-clipping gain of a mix whose sample peak is ``peak``: if the sum of a
    variant's stems peaks above -1 dBFS, the whole track is scaled by one constant gain so
    its peak is exactly -1 dBFS (no limiter, dynamics untouched); otherwise it is left as is."""
    return PEAK_CEILING / peak if peak > PEAK_CEILING else 1.0


# ----- streaming: whole tracks are never held in memory ----------------------------------
class StemLengthError(audio_mod.AudioError):
    """Stems of one track that do not have the same number of frames."""


@dataclass(frozen=True)
class Term:
    """One stored file in a stem: ``weight * samples / scale`` (``imaker.stemset``: a stem
    of several models' files, e.g. an ensemble's average or an instrumental minus drums)."""
    path: Path
    weight: float = 1.0
    scale: float = 1.0


Stems = Mapping[str, "Path | list[Term] | tuple[Term, ...]"]


def _as_terms(paths: Stems, scale: float) -> dict[str, tuple[Term, ...]]:
    """Stem name -> its terms (a plain path is the stem's file divided by ``scale``)."""
    return {name: (Term(Path(v), 1.0, scale),) if isinstance(v, (str, Path)) else tuple(v)
            for name, v in paths.items()}


def _lockstep(paths: Stems, samplerate: int, channels: int, scale: float,
              chunk_frames: int, pool: ThreadPoolExecutor) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of every stem, aligned: ``{name: float32 (channels, n)}`` divided by
    ``scale`` (``stems.json``), the same ``n`` for all. Each file is read
    by its own decoder (``audio.iter_decode``: libFLAC in this process for the stored
    FLAC, which releases the GIL) in ``pool``, one chunk ahead of the consumer. A stem given
    as terms (``Term``) is their weighted sum (each file decoded once)."""
    stems = _as_terms(paths, scale)
    files: dict[Path, float] = {}
    for parts in stems.values():
        for t in parts:
            if files.setdefault(t.path, t.scale) != t.scale:
                raise ValueError(f"{t.path}: two scales")
    for chunks in _lockstep_files(files, samplerate, channels, chunk_frames, pool):
        out = {}
        for name, parts in stems.items():
            if len(parts) == 1 and parts[0].weight == 1.0:
                out[name] = chunks[parts[0].path]
                continue
            acc = np.zeros_like(chunks[parts[0].path])
            for t in parts:
                acc += np.float32(t.weight) * chunks[t.path]
            out[name] = acc
        yield out


def _lockstep_files(scales: Mapping[Path, float], samplerate: int, channels: int,
                    chunk_frames: int, pool: ThreadPoolExecutor
                    ) -> Iterator[dict[Path, np.ndarray]]:
    """Chunks of every file, aligned, each divided by its scale."""
    names = list(scales)
    one_folder = len({Path(n).parent for n in names}) == 1
    label = {n: Path(n).stem if one_folder else f"{Path(n).parent.name}/{Path(n).stem}"
             for n in names}
    iters = {n: audio_mod.iter_decode(n, samplerate, channels, chunk_frames, stored=True)
             for n in names}

    def fetch() -> dict[str, Future]:
        return {n: pool.submit(next, it, None) for n, it in iters.items()}

    pending: dict[str, Future] | None = fetch()
    try:
        while True:
            chunks = {n: f.result() for n, f in pending.items()}
            pending = None
            ended = [n for n, c in chunks.items() if c is None]
            if len(ended) == len(names):
                return
            sizes = {n: c.shape[1] for n, c in chunks.items() if c is not None}
            if ended or len(set(sizes.values())) > 1:
                short = ended or [n for n, k in sizes.items() if k == min(sizes.values())]
                longer = [n for n in names if n not in short]
                raise StemLengthError(f"stems differ in length: {', '.join(label[n] for n in short)} "
                                      f"ended before {', '.join(label[n] for n in longer)}")
            pending = fetch()  # the next chunks decode while this one is used
            for n, chunk in chunks.items():
                chunk /= scales[n]
            yield chunks
    finally:
        if pending is not None:  # no decoder may be running in a thread when it is closed
            wait(pending.values())
        for it in iters.values():
            it.close()  # closes the file (kills an ffmpeg) when not read to the end


def _file_count(paths: Stems) -> int:
    return len({t.path for parts in _as_terms(paths, 1.0).values() for t in parts})


def _variant_sum(chunks: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """The float32 sum of the variant's stems (in the variant's stem order, from zeros)."""
    out = np.zeros_like(chunks[names[0]], dtype=np.float32)
    for name in names:
        out += chunks[name]
    return out


def stream_peaks(paths: Stems, specs: Iterable[VariantSpec], *, samplerate: int,
                 channels: int, scale: float = 1.0,
                 chunk_frames: int = audio_mod.CHUNK_FRAMES) -> dict[str, float]:
    """Pass 1 of ``stream_mix``: the sample peak of every variant's sum, ``{name: peak}``,
    decoding each stem once in chunks (``paths``: stem name -> file, in stems.json order)."""
    plan = {spec.name: spec.stems_for(list(paths)) for spec in specs}
    needed = {n: paths[n] for n in paths if any(n in used for used in plan.values())}
    peaks = dict.fromkeys(plan, 0.0)
    if not plan:
        return peaks
    with ThreadPoolExecutor(max_workers=_file_count(needed)) as pool, \
            closing(_lockstep(needed, samplerate, channels, scale, chunk_frames, pool)) as steps:
        for chunks in steps:
            for name, used in plan.items():
                out = _variant_sum(chunks, used)
                peaks[name] = max(peaks[name], float(np.max(np.abs(out))))
    return peaks


def stream_mix(paths: Stems, outputs: Mapping[VariantSpec, audio_mod.Encoder], *,
               samplerate: int, channels: int, scale: float = 1.0,
               chunk_frames: int = audio_mod.CHUNK_FRAMES) -> dict[str, float]:
    """Mix every variant from stem files straight into its encoder, in bounded memory;
    returns ``{variant name: gain}``.

    ``paths``: stem name -> FLAC (stems.json order; the stored samples are divided by
    ``scale`` of ``stems.json``), or -> its ``Term`` list. ``outputs``: variant -> an unopened
    ``audio.Encoder``. Pass 1 decodes every needed stem once, in chunks, and takes each
    variant's peak of the same float32 sums pass 2 computes, hence its exact gain; pass 2
    decodes again and writes ``sum * gain`` of every variant to its encoder, all encoders
    (one ffmpeg each) running at once. Memory is a few chunks per stem and per variant,
    whatever the track's length. The files are renamed into place only once every
    variant is encoded and tagged: on any error none of them is published."""
    specs = list(outputs)
    if not specs:
        return {}
    gains = {name: gain_for(peak) for name, peak in stream_peaks(
        paths, specs, samplerate=samplerate, channels=channels, scale=scale,
        chunk_frames=chunk_frames).items()}
    plan = {spec: spec.stems_for(list(paths)) for spec in specs}
    needed = {n: paths[n] for n in paths if any(n in used for used in plan.values())}
    with ExitStack() as stack:
        for encoder in outputs.values():
            stack.enter_context(encoder)
        # the pool is left (every write finished) before the encoders close.
        # CPU per run: one ffmpeg encoder per variant, each one core at most (AAC, MP3 and
        # FLAC encoders have no threading: `ffmpeg -h encoder=aac`), beside one decoder per
        # stem file (FLAC decoding in this process is cheap: 0.26 CPU-s per 4 minutes) and
        # this thread's sums. So a run encodes on about as many cores as
        # it makes variants (2 by default) and nothing needs capping per run; what spreads
        # the encoding over the host is the number of runs at once (MAX_CONCURRENT_RUNS,
        # auto max(4, cores // 2): imaker.settings.default_max_runs).
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=_file_count(needed) + len(specs)))
        steps = stack.enter_context(closing(
            _lockstep(needed, samplerate, channels, scale, chunk_frames, pool)))
        writing: list[Future] = []
        for chunks in steps:
            mixed = {}
            for spec, used in plan.items():
                out = _variant_sum(chunks, used)
                if gains[spec.name] != 1.0:
                    out *= gains[spec.name]
                mixed[spec] = out
            for future in writing:  # each encoder gets its chunks in order
                future.result()
            writing = [pool.submit(outputs[spec].write, out) for spec, out in mixed.items()]
        for future in writing:
            future.result()
        # all complete, measured and tagged (in parallel) before any is renamed
        for future in [pool.submit(encoder.finish) for encoder in outputs.values()]:
            future.result()
    return gains
