"""Which models separate a track, and how their stems make the stems the variants mix
(no Dagster).

Two model families share the model folder (``DEMUCS_MODEL_REPO``): demucs bags
(``<name>.yaml`` + ``.th`` weights) and RoFormer checkpoints (``<name>.ckpt`` +
``<name>.yaml``, ``imaker.roformer``). ``plan`` picks the models of one track from the
``Separation`` settings and the variants the track makes:

* ``INSTRUMENTAL_MODEL`` unset: ``DEMUCS_MODEL`` alone; its stems are the variants' stems.
* ``INSTRUMENTAL_MODEL=a[,b...]``: the instrumental is the average of those models'
  non-vocal outputs (``vocals`` excluded). ``DEMUCS_MODEL`` runs only when a variant made
  for the track mentions a stem other than ``vocals`` (the variant table says which:
  ``no_drums`` and ``drums_only`` mention ``drums``); then the variants' stems are those
  demucs stems, ``vocals`` (the instrumental models') and ``rest`` = the instrumental minus
  those demucs stems. The variant table mixes them as it mixes demucs stems: instrumental =
  everything but vocals = the models' instrumental; no_drums = rest = instrumental minus
  the demucs drums; drums_only = the demucs drums.

Stems store of a track (``stems/<job_id>/``)::

    <model>/<stem>.flac      each model's own stems (24-bit, scaled by its "scale")
    <model>/model.json       that model's record (``describe``): name, family,
                             architecture, sha256, signature, stems, device, precision,
                             scale, and the key its stems were made with
    stems.json               the track's set: "sources" (the variants' stems), "stems"
                             (each as a weighted sum of model files: ``terms``),
                             "models" (the records), the model/signature/... fields of
                             a single model as before

A model's folder is reused when its key (signature, windowing, the source's sha256) is the
one the plan asks for: switching ``INSTRUMENTAL_MODEL`` re-separates with the new model
only, the demucs stems stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .variants import VARIANTS, Term

log = logging.getLogger(__name__)

#: the model families of the model folder
DEMUCS, ROFORMER = "demucs", "roformer"
FAMILIES = (DEMUCS, ROFORMER)
#: the stem every instrumental leaves out
VOCALS = "vocals"
#: the variants' stem that is "the instrumental minus the demucs stems used beside it"
REST = "rest"
SET_FILE = "stems.json"
MODEL_FILE = "model.json"


class PlanError(ValueError):
    """Settings that cannot make the variants (one line, naming the model or variant)."""


def family(name: str, repo: Path | None) -> str:
    """``roformer`` when ``repo`` holds ``<name>.ckpt`` beside ``<name>.yaml``, else demucs."""
    from . import roformer

    return ROFORMER if repo is not None and roformer.is_roformer(name, Path(repo)) else DEMUCS


@dataclass(frozen=True)
class Plan:
    demucs: str | None                 # DEMUCS_MODEL, when a variant needs its stems
    instrumental: tuple[str, ...] = ()  # INSTRUMENTAL_MODEL (averaged)
    needs: tuple[str, ...] = ()         # demucs stems the variants use beside the instrumental

    @property
    def models(self) -> tuple[str, ...]:
        return (*self.instrumental, *((self.demucs,) if self.demucs else ()))


def plan(separation, variants: Iterable[str] | None = None) -> Plan:
    """The models for a track making ``variants`` (None: every variant of the table)."""
    if not separation.instrumental_model:
        return Plan(demucs=separation.model)
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise PlanError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    mentioned = {stem for v in names for stem in VARIANTS[v].mentions}
    needs = tuple(sorted(mentioned - {VOCALS}))
    instrumental = tuple(dict.fromkeys(separation.instrumental_model))
    if separation.model in instrumental and needs:
        raise PlanError(f"INSTRUMENTAL_MODEL names DEMUCS_MODEL ({separation.model})")
    return Plan(demucs=separation.model if needs else None, instrumental=instrumental,
                needs=needs)


# ----- the variants' stems from the models' records -------------------------------------
def _files(record: dict, stems: Iterable[str], weight: float) -> list[dict]:
    return [{"file": f"{record['folder']}/{s}.flac", "weight": weight,
             "scale": record["scale"]} for s in stems]


def compose(p: Plan, records: dict[str, dict]) -> dict[str, list[dict]]:
    """``{variants' stem: [{"file", "weight", "scale"}, ...]}`` (files relative to the
    track's stems folder) from the models' records (``model.json``), as the module doc says."""
    if not p.instrumental:
        rec = records[p.demucs]
        return {s: _files(rec, [s], 1.0) for s in rec["sources"]}
    k = len(p.instrumental)
    vocals, instrumental = [], []
    for name in p.instrumental:
        rec = records[name]
        voice = [s for s in rec["sources"] if s.lower() == VOCALS]  # "Vocals" in some configs
        if not voice:
            raise PlanError(f"INSTRUMENTAL_MODEL {name} gives no {VOCALS} stem "
                            f"({', '.join(rec['sources'])}): no instrumental to take from it")
        vocals += _files(rec, voice, 1.0 / k)
        instrumental += _files(rec, [s for s in rec["sources"] if s not in voice], 1.0 / k)
    if not p.needs:
        return {VOCALS: vocals, "instrumental": instrumental}
    rec = records[p.demucs]
    missing = [s for s in p.needs if s not in rec["sources"]]
    if missing:
        raise PlanError(f"DEMUCS_MODEL {p.demucs} gives no {', '.join(missing)} stem "
                        f"({', '.join(rec['sources'])})")
    out = {s: _files(rec, [s], 1.0) for s in p.needs}
    out[VOCALS] = vocals
    out[REST] = instrumental + _files(rec, p.needs, -1.0)
    return out


def terms(folder: Path, meta: dict) -> dict[str, list[Term]]:
    """The variants' stems of a stored set (``stems.json``) as files to sum; a set stored
    before per-model folders is ``<stem>.flac`` scaled by its one ``scale``."""
    folder = Path(folder)
    if "stems" not in meta:
        return {s: [Term(folder / f"{s}.flac", 1.0, meta["scale"])] for s in meta["sources"]}
    return {s: [Term(folder / t["file"], float(t["weight"]), float(t["scale"])) for t in parts]
            for s, parts in meta["stems"].items()}


def stored_files(folder: Path, meta: dict) -> list[tuple[str, str, Path, float]]:
    """Every stored stem file of a set: ``(model, stem, path, scale)``."""
    folder = Path(folder)
    if "models" not in meta:
        return [(meta["model"], s, folder / f"{s}.flac", meta["scale"]) for s in meta["sources"]]
    return [(rec["name"], s, folder / rec["folder"] / f"{s}.flac", rec["scale"])
            for rec in meta["models"] for s in rec["sources"]]


# ----- identities: data versions and reuse ----------------------------------------------
_SHA: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def checkpoint_sha256(path: Path) -> str:
    """The file's sha256, computed once per (path, size, mtime) in this process."""
    from .roformer import file_sha256

    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA:
            return _SHA[key]
    digest = file_sha256(Path(path))
    with _SHA_LOCK:
        _SHA[key] = digest
    return digest


def model_signature(name: str, repo: Path | None) -> str:
    """A model's identity without loading it: ``name@<sha256[:12]>`` of a RoFormer
    checkpoint, the signatures of a demucs bag (its yaml), or the name."""
    if family(name, repo) == ROFORMER:
        return f"{name}@{checkpoint_sha256(Path(repo) / f'{name}.ckpt')[:12]}"
    bag = Path(repo) / f"{name}.yaml" if repo is not None else None
    if bag is not None and bag.is_file():
        import yaml

        try:
            sigs = (yaml.safe_load(bag.read_text()) or {}).get("models") or []
        except (yaml.YAMLError, AttributeError):
            sigs = []
        if sigs:
            return "+".join(str(s) for s in sigs)
    return name


def settings_identity(separation) -> str:
    """What the separation settings would separate with, as one line (the observed data
    version of the models: a change marks every track's stems stale)."""
    repo = separation.model_repo
    parts = [f"demucs={separation.model}:{_safe_signature(separation.model, repo)}"]
    for name in separation.instrumental_model:
        parts.append(f"instrumental={name}:{_safe_signature(name, repo)}")
    return " ".join(parts)


def _safe_signature(name: str, repo: Path | None) -> str:
    try:
        return model_signature(name, repo)
    except OSError:
        return "missing"


def data_version(meta: dict) -> str:
    """The stems' data version: the models (names, signatures, keys) and the source."""
    models = meta.get("models") or [{"name": meta.get("model"), "signature": meta.get("signature")}]
    payload = [[m.get("name"), m.get("signature"), m.get("key")] for m in models]
    return hashlib.sha256(json.dumps([payload, meta.get("source_sha256")],
                                     sort_keys=True).encode()).hexdigest()[:24]


# ----- the two families behind one interface (the separation service) --------------------
_ROFORMERS: dict[tuple[str, str, str], object] = {}
_LOAD_LOCK = threading.Lock()


def load(name: str, repo: Path | None, device: str = "auto"):
    """A model of either family, loaded once per (name, repo, device) and kept: a
    ``separation.LoadedModel`` (demucs) or a ``roformer.RoformerModel``. A RoFormer model
    whose checkpoint changed on disk (another sha256) is loaded again. Errors are one line
    naming the file (``separation.SeparationError``)."""
    from . import roformer, separation

    if family(name, repo) == DEMUCS:
        return separation.load_model(name, repo, device)
    device = separation.resolve_device(device)
    ckpt, yaml_path = roformer.model_files(name, Path(repo))
    key = (name, str(repo), device)
    with _LOAD_LOCK:
        try:
            sha = checkpoint_sha256(ckpt)
            cached = _ROFORMERS.get(key)
            if cached is not None and cached.sha256 == sha:
                return cached
            model = roformer.load(ckpt, yaml_path, device, name=name, sha256=sha)
        except (roformer.RoformerError, roformer.RoformerConfigError, OSError) as exc:
            raise separation.SeparationError(
                f"cannot load RoFormer model {name!r}: {_one_line(exc)}") from None
        _ROFORMERS[key] = model
        return model


def release_except(keep: Iterable[tuple[str, str | None]]) -> list[str]:
    """Drop the loaded models (both families) whose ``(name, repo)`` is not in ``keep``
    and hand their memory back; returns their names. The separation service calls it with
    the models its running separations plan (``Service``): a model the settings no longer
    name (``INSTRUMENTAL_MODEL`` or ``DEMUCS_MODEL`` switched) does not stay resident for
    the life of a long-lived service (1.3 GB at Kim's Mel-Band size)."""
    from . import separation

    wanted = {(name, str(repo) if repo else None) for name, repo in keep}
    dropped, networks = [], []
    with _LOAD_LOCK:
        for cache in (separation._CACHE, _ROFORMERS):
            for key in list(cache):
                if (key[0], key[1]) not in wanted:
                    dropped.append(key[0])
                    networks.append(getattr(cache.pop(key), "model", None))
    if dropped:  # a model was loaded, so torch is imported already
        import gc

        import torch

        from . import backends

        backends.forget([n for n in networks if n is not None])  # their compiled engines
        del networks
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        from .roformer.net import release_freed_memory

        release_freed_memory()
    return dropped


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def loaded_models() -> list:
    """Every model loaded in this process (both families), for /health."""
    from . import separation

    return [*separation._CACHE.values(), *_ROFORMERS.values()]


_BACKEND_WARNED: set[str] = set()


def roformer_backend(setting: str | None, loaded) -> str:
    """What runs a RoFormer network: PyTorch. ``DEMUCS_BACKEND=auto``/``torch`` choose it;
    a converted backend named explicitly (``openvino``, ``onnx``, ``aoti``) does not apply
    to RoFormer models (benchmarks/RESULTS.md, issue 21: OpenVINO converts Kim's Mel-Band
    RoFormer in 6-8 minutes and ~9 GB): a warning, once per setting, then PyTorch."""
    setting = (setting or "auto").lower()
    if setting not in ("auto", "torch") and setting not in _BACKEND_WARNED:
        _BACKEND_WARNED.add(setting)
        log.warning("DEMUCS_BACKEND=%s does not apply to RoFormer models (%s); using torch",
                    setting, getattr(loaded, "name", "?"))
    return "torch"


def is_roformer_model(loaded) -> bool:
    from .roformer import RoformerModel

    return isinstance(loaded, RoformerModel)


def describe(loaded, precision: str = "fp32") -> dict:
    """A loaded model's provenance (``model.json``, the manifest)."""
    if is_roformer_model(loaded):
        return {**loaded.describe(), "precision": precision, "signature": loaded.signature}
    files = demucs_files(loaded.name, loaded.repo)
    digests = {f.name: checkpoint_sha256(f) for f in files}
    sha = (next(iter(digests.values())) if len(digests) == 1 else
           hashlib.sha256(" ".join(digests[k] for k in sorted(digests)).encode()).hexdigest()
           if digests else None)
    model = loaded.model
    inner = getattr(model, "models", None)  # a bag: its models' class
    architecture = type(inner[0] if inner else model).__name__
    return {"name": loaded.name, "family": DEMUCS, "architecture": architecture,
            "sha256": sha, "files": digests, "signature": loaded.signature,
            "stems": list(loaded.sources), "samplerate": loaded.samplerate,
            "device": str(loaded.device), "precision": precision}


def demucs_files(name: str, repo: Path | None) -> list[Path]:
    """The weight files of a demucs model in a local repo (none for the hub's cache)."""
    if repo is None:
        return []
    from .models import installed

    for entry in installed(Path(repo)):
        if entry.name == name:
            return [Path(repo) / f for f in entry.files]
    return []


def key(loaded, separation) -> dict:
    """What a model's stems depend on besides the source: its signature and the windowing
    settings of its family."""
    if is_roformer_model(loaded):
        return {"signature": loaded.signature, "chunk_size": loaded.chunk_size,
                "num_overlap": loaded.num_overlap}
    return {"signature": loaded.signature, "segment": separation.segment,
            "overlap": separation.overlap, "shifts": separation.shifts}
