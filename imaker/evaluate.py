"""``imaker eval``: separation quality on a folder in MUSDB18-HQ layout (no Dagster).

    DIR/<track>/mixture.wav + DIR/<track>/{vocals,drums,bass,other}.wav

Each track is separated by each model (either family, loaded as the separation service
loads it: ``stemset.load``) and scored per stem and for the instrumental (the model's
non-vocal stems summed, against mixture minus vocals = drums + bass + other):

* **BSS-eval v4 SDR** as MUSDB's tables report it: museval's ``evaluate`` (1 s windows and
  hops, time-invariant 512-tap distortion filters), the median over the track's windows,
  then the median over tracks. museval is optional (``pip install museval``; in the test
  extra); without it this column is left out.
* **multisong SDR** as MVSEP reports it: ``10 log10(||s||² / ||s - ŝ||²)`` over the whole
  track (all channels), averaged over tracks.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STEMS = ("vocals", "drums", "bass", "other")
INSTRUMENTAL = "instrumental"
VOCALS = "vocals"


class EvalError(RuntimeError):
    pass


def tracks(folder: Path) -> list[Path]:
    """The track folders of ``folder`` (those with a ``mixture.wav``), sorted."""
    found = sorted(p.parent for p in Path(folder).glob("*/mixture.wav"))
    if not found:
        raise EvalError(f"{folder}: no <track>/mixture.wav (MUSDB18-HQ layout)")
    return found


def read_track(track: Path, samplerate: int = 44100) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(mixture, {stem: reference})``, float32 ``(channels, samples)`` at ``samplerate``;
    the references also hold ``instrumental`` = every reference stem but vocals."""
    from . import audio

    mix = audio.decode(track / "mixture.wav", samplerate, 2)
    refs = {s: audio.decode(track / f"{s}.wav", samplerate, 2) for s in STEMS
            if (track / f"{s}.wav").is_file()}
    if VOCALS in refs and len(refs) > 1:
        refs[INSTRUMENTAL] = sum(v for k, v in refs.items() if k != VOCALS)
    return mix, refs


def separate(loaded, mix: np.ndarray, separation=None) -> dict[str, np.ndarray]:
    """The model's stems of ``mix`` (in memory) plus ``instrumental`` (its non-vocal
    stems summed), as the pipeline makes the instrumental."""
    from . import separation as demucs_sep
    from . import stemset

    if stemset.is_roformer_model(loaded):
        out = loaded.separate(mix)
    else:
        o = separation
        out = demucs_sep.separate(loaded, mix, segment=getattr(o, "segment", None),
                                  overlap=getattr(o, "overlap", 0.25),
                                  shifts=getattr(o, "shifts", 1), cpu_autocast=False,
                                  backend="torch")
    voice = [k for k in out if k.lower() == VOCALS]
    stems = {(VOCALS if k in voice else k): v for k, v in out.items()}
    if voice:
        stems[INSTRUMENTAL] = sum(v for k, v in out.items() if k not in voice)
    return stems


def multisong_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """MVSEP's SDR: ``10 log10(||s||² / ||s - ŝ||²)`` (float64, all channels)."""
    ref, est = np.asarray(ref, np.float64), np.asarray(est, np.float64)
    num, den = np.sum(ref ** 2), np.sum((ref - est) ** 2)
    eps = 1e-8  # as MVSEP's and ZFTurbo's sdr(): defined on silence
    return float(10 * np.log10((num + eps) / (den + eps)))


def bsseval_median_sdr(refs: dict[str, np.ndarray], ests: dict[str, np.ndarray],
                       samplerate: int = 44100) -> dict[str, float]:
    """BSS-eval v4 SDR per stem, the median over 1 s windows (NaN windows, e.g. silent
    references, left out), as museval computes it for MUSDB's tables: each stem is scored
    against its own reference (``museval.evaluate`` of one source, as its ``eval_mus_track``
    scores the estimates it is given)."""
    import museval

    out = {}
    for name, est in ests.items():
        ref = refs[name]
        sdr, _, _, _ = museval.evaluate(ref.T[None], est.T[None], win=samplerate, hop=samplerate)
        out[name] = float(np.nanmedian(sdr[0]))
    return out


@dataclass
class Scores:
    model: str
    tracks: list[str] = field(default_factory=list)
    bsseval: dict[str, list[float]] = field(default_factory=dict)
    multisong: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    audio_seconds: float = 0.0

    def table_row(self, stem: str) -> tuple[float | None, float | None]:
        b = self.bsseval.get(stem)
        m = self.multisong.get(stem)
        return (statistics.median(b) if b else None, statistics.fmean(m) if m else None)


def score_track(refs: dict[str, np.ndarray], ests: dict[str, np.ndarray], *,
                bsseval: bool = True) -> dict[str, dict[str, float]]:
    """``{"multisong": {stem: dB}, "bsseval": {stem: dB}}`` for the stems both have."""
    common = {k: ests[k] for k in ests if k in refs}
    out = {"multisong": {k: multisong_sdr(refs[k], v) for k, v in common.items()}}
    if bsseval:
        out["bsseval"] = bsseval_median_sdr(refs, common)
    return out


def has_museval() -> bool:
    try:
        import museval  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate(folder: Path, models: list[str], separation, log=print) -> list[Scores]:
    """Every model over every track of ``folder``."""
    import time

    from . import stemset

    use_bss = has_museval()
    results = []
    for name in models:
        loaded = stemset.load(name, separation.model_repo, separation.device)
        scores = Scores(name)
        for track in tracks(folder):
            mix, refs = read_track(track, loaded.samplerate)
            start = time.perf_counter()
            ests = separate(loaded, mix, separation)
            scores.seconds += time.perf_counter() - start
            scores.audio_seconds += mix.shape[1] / loaded.samplerate
            got = score_track(refs, ests, bsseval=use_bss)
            scores.tracks.append(track.name)
            for kind in ("multisong", "bsseval"):
                for stem, value in got.get(kind, {}).items():
                    getattr(scores, kind).setdefault(stem, []).append(value)
            log(f"{name} {track.name}: " + ", ".join(
                f"{s} {v:.2f}" for s, v in got["multisong"].items()) + " dB (multisong)")
        results.append(scores)
    return results


def markdown(results: list[Scores], folder: Path) -> str:
    """The results table (``benchmarks/RESULTS.md``)."""
    lines = [f"| model | stem | BSS-eval v4 SDR (median) | multisong SDR (mean) | tracks | "
             f"s per audio s |", "|---|---|---|---|---|---|"]
    for r in results:
        for stem in (INSTRUMENTAL, *STEMS):
            b, m = r.table_row(stem)
            if b is None and m is None:
                continue
            rate = r.seconds / max(r.audio_seconds, 1e-9)
            lines.append(f"| {r.model} | {stem} | {'' if b is None else f'{b:.2f}'} | "
                         f"{'' if m is None else f'{m:.2f}'} | {len(r.tracks)} | {rate:.3f} |")
    return (f"`imaker eval {folder}` ({', '.join(r.model for r in results)}):\n\n"
            + "\n".join(lines) + "\n")
