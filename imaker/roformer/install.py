"""Installing RoFormer models into the model folder (``DEMUCS_MODEL_REPO``): a file the
user downloaded (``add``), a well-known public checkpoint (``fetch``, the ``CATALOGUE``),
and what the folder holds (``listing``). No Dagster.

Every model is checked before it is installed: its config is read (a one-line reason
naming the file for an unsupported architecture or option), the checkpoint loads into the
network with ``strict=True`` and one window runs (finite output). Files are copied or
downloaded to temporary names in the folder and renamed into place (checkpoint first,
config last: ``<name>.ckpt`` + ``<name>.yaml`` is a model only once both are there).

The checkpoints' weights carry no stated licence; using them is the user's responsibility.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..stemset import ROFORMER
from .config import RoformerConfigError
from .model import RoformerError, file_sha256, load, scan

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InstallError(RuntimeError):
    """A model that cannot be installed; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class Published:
    """A well-known public checkpoint: where people download it (checkpoint + config)."""

    name: str
    ckpt_url: str
    yaml_url: str
    #: the sha256 of the published checkpoint, when known (None: not found; ``fetch``
    #: then needs it from the user, ``--sha256``)
    ckpt_sha256: str | None
    about: str
    #: the config's sha256, when its URL names a fixed revision (checked after download)
    yaml_sha256: str | None = None

    @property
    def files(self) -> tuple[str, str]:
        return (self.ckpt_url.rsplit("/", 1)[1].split("?")[0],
                self.yaml_url.rsplit("/", 1)[1].split("?")[0])


#: ZFTurbo's configs at a fixed commit (the files' last change there: Kim's August 2024,
#: ep_317's April 2024), so the bytes behind a URL cannot change; copies in
#: tests/data/roformer/ (their sha256s below)
_ZF = ("https://raw.githubusercontent.com/ZFTurbo/Music-Source-Separation-Training/"
       "ccc011abf7f89dd7922bb2888d48493b575c0289/configs")
#: well-known checkpoints, as python-audio-separator / ZFTurbo's pretrained_models.md list
#: them. The sha256s could not be taken from the files here (no network): each is the one
#: several independent public projects pin for that file (Kim's: 913,106,900 bytes at the
#: Hugging Face revision in the URL, the same file UVR's model repository mirrors as
#: vocals_mel_band_roformer.ckpt; ep_317's: the ~640 MB file of UVR's model repository
#: release), found with the workplace's code search on 2026-12-02. None where no digest
#: was found: ``fetch`` then needs ``--sha256`` from the user.
CATALOGUE: dict[str, Published] = {p.name: p for p in (
    Published("mel_band_roformer_kim",
              "https://huggingface.co/KimberleyJSN/melbandroformer/resolve/"
              "ac9b0614ab3cd7f77219e18ba494dfd93956c348/MelBandRoformer.ckpt",
              f"{_ZF}/KimberleyJensen/config_vocals_mel_band_roformer_kj.yaml",
              "87201f4d31afb5bc79993230fc49446918425574db48c01c405e44f365c7559e",
              "Kimberley Jensen's Mel-Band RoFormer (vocals, other); multisong SDR vocals "
              "11.01 / instrumental 17.32 (MVSEP)",
              "f63f38eb1e6e40a7db0dade714a5ae257555dd8748f4e774eae8679275a81926"),
    Published("bs_roformer_ep_317_viperx",
              "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/"
              "model_bs_roformer_ep_317_sdr_12.9755.ckpt",
              f"{_ZF}/viperx/model_bs_roformer_ep_317_sdr_12.9755.yaml",
              "5b84f37e8d444c8cb30c79d77f613a41c05868ff9c9ac6c7049c00aefae115aa",
              "viperx's BS-RoFormer ep_317 (vocals, other); multisong SDR instrumental 17.2",
              "42e5635ceab7287b83d9591c9880966f0b61cff26a0a40a29d236bacb32e5f2c"),
    Published("mel_band_roformer_inst_v1e_unwa",
              "https://huggingface.co/pcunwa/Mel-Band-Roformer-Inst/resolve/main/inst_v1e.ckpt",
              "https://huggingface.co/pcunwa/Mel-Band-Roformer-Inst/resolve/main/"
              "config_melbandroformer_inst.yaml", None,
              "unwa's instrumental fine-tune of the Mel-Band RoFormer (inst v1e)"),
)}


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise InstallError(f"{name!r} is not a model name (letters, digits, '.', '_', '-')")
    return name


def verify(ckpt: Path, yaml_path: Path, *, name: str | None = None) -> dict:
    """Load the model from these files (strict) and run one window of noise through it.
    Returns what ``listing`` shows; ``InstallError`` naming the file otherwise."""
    import numpy as np

    try:
        model = load(ckpt, yaml_path, "cpu", name=name)
        noise = np.random.default_rng(0).standard_normal(
            (model.channels, model.chunk_size)).astype(np.float32) * 0.1
        out = model.separate(noise)
    except (RoformerConfigError, RoformerError) as exc:
        raise InstallError(" ".join(str(exc).split())) from None
    except Exception as exc:  # noqa: BLE001 - the window itself failed: one line
        raise InstallError(f"{ckpt}: one window does not run ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]})") from None
    bad = [stem for stem, wav in out.items() if not np.isfinite(wav).all()]
    if bad:
        raise InstallError(f"{ckpt}: one window gives non-finite samples ({', '.join(bad)})")
    return {"name": model.name, "architecture": model.architecture, "stems": model.sources,
            "sha256": model.sha256, "parameters": model.parameters}


def _copy_in(src: Path, dest: Path) -> None:
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, part)
        os.replace(part, dest)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise


def _refuse_taken(name: str, repo: Path, sha256: str) -> None:
    ckpt, yaml_path = repo / f"{name}.ckpt", repo / f"{name}.yaml"
    if yaml_path.is_file() and not ckpt.is_file():
        raise InstallError(f"{yaml_path}: a demucs model is called {name!r} already "
                           "(--name another)")
    if ckpt.is_file() and file_sha256(ckpt) != sha256:
        raise InstallError(f"{ckpt}: another checkpoint is installed as {name!r} (remove it "
                           "first, or --name another)")


def add(ckpt: Path, yaml_path: Path, repo: Path, *, name: str | None = None) -> dict:
    """Check the model (``verify``) and copy it into ``repo`` as ``<name>.ckpt`` +
    ``<name>.yaml`` (default name: the checkpoint's file name)."""
    ckpt, yaml_path, repo = Path(ckpt), Path(yaml_path), Path(repo)
    for path in (ckpt, yaml_path):
        if not path.is_file():
            raise InstallError(f"{path}: no such file")
    name = check_name(name or ckpt.stem)
    info = verify(ckpt, yaml_path, name=name)
    repo.mkdir(parents=True, exist_ok=True)
    _refuse_taken(name, repo, info["sha256"])
    _copy_in(ckpt, repo / f"{name}.ckpt")
    _copy_in(yaml_path, repo / f"{name}.yaml")
    return info


def fetch(name: str, repo: Path, *, root_url: str | None = None, sha256: str | None = None,
          catalogue: dict[str, Published] | None = None, log=print) -> dict:
    """Download the catalogue's model ``name`` (from ``root_url``, a mirror holding the
    published file names, when given), check the checkpoint's sha256 (the catalogue's, or
    ``sha256``), ``verify`` it and install it as ``<name>.ckpt`` + ``<name>.yaml``."""
    from ..models import ModelError, download

    table = CATALOGUE if catalogue is None else catalogue
    entry = table.get(name)
    if entry is None:
        raise InstallError(f"unknown RoFormer model {name!r}; known: {', '.join(sorted(table))}")
    expected = (sha256 or entry.ckpt_sha256 or "").lower() or None
    if expected is None:
        raise InstallError(
            f"{name}: no published sha256 of {entry.files[0]} is known here: pass --sha256 "
            f"(from the publisher's page) or download it yourself and `imaker models add` it")
    if entry.ckpt_sha256 and sha256 and sha256.lower() != entry.ckpt_sha256:
        raise InstallError(f"{name}: --sha256 differs from the catalogue's {entry.ckpt_sha256}")
    urls = (entry.ckpt_url, entry.yaml_url)
    if root_url:
        urls = tuple(root_url.rstrip("/") + "/" + f for f in entry.files)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=repo) as tmp:
        ckpt, yaml_path = Path(tmp) / f"{name}.ckpt", Path(tmp) / f"{name}.yaml"
        try:
            log(f"{name}: downloading {urls[0]}")
            download(urls[0], ckpt, expected, label=name)
            download(urls[1], yaml_path, entry.yaml_sha256, label=name)
        except ModelError as exc:
            raise InstallError(str(exc)) from None
        info = verify(ckpt, yaml_path, name=name)
        _refuse_taken(name, repo, info["sha256"])
        os.replace(ckpt, repo / f"{name}.ckpt")
        os.replace(yaml_path, repo / f"{name}.yaml")
    log(f"{name}: {info['architecture']}, stems {', '.join(info['stems'])}, sha256 "
        f"{info['sha256']} in {repo}")
    return info


def listing(repo: Path) -> list[dict]:
    """Every RoFormer model in ``repo``: family, architecture, stems, size, sha256, and
    whether it loads (and runs one window), or why not."""
    out = []
    for m in scan(repo):
        row = {"name": m.name, "family": ROFORMER, "architecture": m.architecture,
               "stems": list(m.stems), "size_bytes": m.size_bytes,
               "sha256": file_sha256(m.ckpt), "loads": False, "error": m.error}
        if m.error is None:
            try:
                verify(m.ckpt, m.yaml, name=m.name)
                row["loads"] = True
            except InstallError as exc:
                row["error"] = str(exc)
        out.append(row)
    return out
