"""The variant table: how each output is mixed from separated stems.

Adding a variant is one entry here; stems are mixed by inclusion/exclusion so that
4-stem and 6-stem demucs models both work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Peak ceiling for every mixed variant (-1 dBFS). See ``mix``.
PEAK_CEILING = 10 ** (-1.0 / 20)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    label: str
    suffix: str  # appended to "Artist - Track" in the file name
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] | None = None  # None = every stem not excluded

    def stems_for(self, available: list[str]) -> list[str]:
        chosen = [s for s in available
                  if (self.include is None or s in self.include) and s not in self.exclude]
        if not chosen:
            raise ValueError(f"variant {self.name!r} selects no stem out of {available}")
        return chosen


VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec("instrumental", "Instrumental", "", exclude=("vocals",)),
        VariantSpec("no_drums", "Instrumental (no drum)", " (no drum)", exclude=("vocals", "drums")),
        VariantSpec("drums_only", "Drums only", " (drums only)", include=("drums",)),
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


def mix(stems: dict[str, np.ndarray], spec: VariantSpec) -> tuple[np.ndarray, float]:
    """Sum the variant's stems. Anti-clipping rule: if the sum peaks above -1 dBFS, the
    whole track is scaled by one constant gain so its peak is exactly -1 dBFS (no
    limiter, dynamics untouched); otherwise it is left as is. Returns (audio, gain)."""
    names = spec.stems_for(list(stems))
    out = np.zeros_like(stems[names[0]], dtype=np.float32)
    for name in names:
        out += stems[name]
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    gain = 1.0
    if peak > PEAK_CEILING:
        gain = PEAK_CEILING / peak
        out *= gain
    return out, gain
