"""The track catalog: one row per processed track, built from manifests and small JSON
records only (never re-reads audio), saved as CSV. No Dagster."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .bundle import iter_manifests, manifest_section
from .fsutil import atomic_path
from .nas.sync import read_sync_record

if TYPE_CHECKING:  # imported where used: every run process imports this module (170 ms)
    import pandas as pd

CATALOG_FILE = "catalog.csv"
COLUMNS = ["job_id", "artist", "album", "title", "source_type", "source_url", "duration_s",
           "input_peak_dbfs", "variants", "replaygain_db", "stems_kept", "stems_published", "nas_sync", "processed_at", "model",
           "signature", "device", "instrumental_model"]


def _nas_state(output_dir: Path) -> str:
    data = read_sync_record(output_dir)
    if data is None:
        return "not synced"
    status = data.get("status")
    if isinstance(status, str):
        return status
    items = data.get("artifacts") or []
    if isinstance(items, list) and items:
        return ",".join(sorted({str(i.get("status")) for i in items if isinstance(i, dict)}))
    return "unknown"


def _instrumental(sep: dict) -> str:
    names = sep.get("instrumental_model") or []
    models = {m.get("name"): m for m in sep.get("models") or [] if isinstance(m, dict)}
    return ",".join(f"{n}@{(models.get(n, {}).get('sha256') or '')[:12]}".rstrip("@")
                    for n in names)


def build_catalog(outputs_dir: Path, stems_dir: Path, job_ids: Iterable[str] | None = None
                  ) -> pd.DataFrame:
    """Rows for every ``outputs/<job_id>/manifest.json`` (restricted to ``job_ids`` if given)."""
    rows = []
    for job_id, folder, man in iter_manifests(outputs_dir, job_ids):
        prov = manifest_section(man, "provenance")
        sep = manifest_section(prov, "separation")
        src = manifest_section(prov, "source")
        arts = [a for a in man.get("artifacts") or [] if isinstance(a, dict)]
        rows.append({
            "job_id": job_id, "artist": man.get("artist"), "album": man.get("album"),
            "title": man.get("title"), "source_type": man.get("source_type"),
            "source_url": src.get("url"), "duration_s": src.get("duration_s"),
            "input_peak_dbfs": src.get("input_peak_dbfs"),
            "variants": ",".join(str(a.get("variant")) for a in arts if a.get("kind") == "audio"),
            # ReplayGain 2.0 track gain of each variant, as tagged in its file
            "replaygain_db": ",".join(
                f"{a['variant']}={a['replaygain_track_gain_db']:+.2f}" for a in arts
                if a.get("kind") == "audio" and a.get("replaygain_track_gain_db") is not None),
            "stems_kept": (Path(stems_dir) / job_id / "stems.json").is_file(),
            "stems_published": bool(man.get("stems_preserved")),
            "nas_sync": _nas_state(folder), "processed_at": prov.get("created_at"),
            "model": sep.get("model"), "signature": sep.get("signature"),
            "device": sep.get("device"),
            # the model(s) of the instrumental (INSTRUMENTAL_MODEL), with their checkpoint
            # sha256 prefix; empty when DEMUCS_MODEL made every variant
            "instrumental_model": _instrumental(sep),
        })
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS)


def write_catalog(df: pd.DataFrame, outputs_dir: Path) -> Path:
    dest = Path(outputs_dir) / CATALOG_FILE
    with atomic_path(dest) as tmp:
        df.to_csv(tmp, index=False)
    return dest
