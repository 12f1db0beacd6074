"""Demucs weights in a local model repo (``DEMUCS_MODEL_REPO``, default
``$IMAKER_DATA/models``): fetched once through demucs' own download table, verified, listed.

    imaker models fetch [NAME ...]     download into the repo (default: DEMUCS_MODEL)
    imaker models list                 what the repo holds, and whether each bag is complete

A repo is the folder layout ``demucs --repo`` reads: ``<sig>-<hash>.th`` per model and
``<name>.yaml`` per bag (the yaml copied from demucs' package). Downloads go to a temporary
name, are checked by torch against the sha256 prefix in the file name, renamed into place,
and every bag is then loaded from the repo by demucs (no network) before it is reported.

No other imaker module is imported here: the image build runs this file on its own
(``python imaker/models.py fetch --repo /models htdemucs``) before the package is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


class ModelError(RuntimeError):
    """A model that cannot be fetched or is not in the repo; the message says what to do."""


@dataclass(frozen=True)
class Bag:
    name: str
    yaml_text: str
    files: tuple[tuple[str, str], ...]  # (file name, url)


def _remote_root() -> Path:
    from demucs import pretrained

    return Path(pretrained.REMOTE_ROOT)


def known_names(catalog: Path | None = None) -> list[str]:
    """The bags demucs can download (``htdemucs``, ``htdemucs_ft``, ``mdx_extra``, ...)."""
    return sorted(p.stem for p in (catalog or _remote_root()).glob("*.yaml"))


def plan(names: list[str], *, root_url: str | None = None,
         catalog: Path | None = None) -> list[Bag]:
    """What ``fetch`` downloads: demucs' table (``remote/files.txt`` + ``<name>.yaml`` in
    its package, or ``catalog`` laid out the same way) with its download root, or
    ``root_url`` (a mirror with the same paths)."""
    import yaml
    from demucs import pretrained

    catalog = catalog or _remote_root()
    remote = pretrained._parse_remote_files(catalog / "files.txt")  # {sig: url}
    default_root = pretrained.ROOT_URL
    bags = []
    for name in names:
        bag_yaml = catalog / f"{name}.yaml"
        if not bag_yaml.is_file():
            raise ModelError(f"unknown demucs model {name!r}; known: "
                             f"{', '.join(known_names(catalog))}")
        text = bag_yaml.read_text()
        files = []
        for sig in yaml.safe_load(text)["models"]:
            url = remote.get(sig)
            if url is None:
                raise ModelError(f"{name}: demucs has no download for its model {sig}")
            if root_url:
                url = root_url.rstrip("/") + "/" + url[len(default_root):]
            files.append((url.rsplit("/", 1)[1], url))
        bags.append(Bag(name, text, tuple(files)))
    return bags


def _hash_prefix(file_name: str) -> str:
    return file_name.rsplit("-", 1)[1].split(".")[0]


def fetch(names: list[str], repo: Path, *, root_url: str | None = None,
          catalog: Path | None = None, log=print) -> list[str]:
    """Download the bags ``names`` into ``repo`` (files already there are kept), verify,
    and load each from the repo. Returns the names fetched."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    for bag in plan(names, root_url=root_url, catalog=catalog):
        for file_name, url in bag.files:
            dest = repo / file_name
            if dest.is_file():
                continue
            log(f"{bag.name}: downloading {url}")
            download(url, dest, _hash_prefix(file_name), label=bag.name)
        yaml_dest = repo / f"{bag.name}.yaml"
        tmp = repo / f".{bag.name}.yaml.part"
        tmp.write_text(bag.yaml_text)
        os.replace(tmp, yaml_dest)
        _load(bag.name, repo)
        log(f"{bag.name}: {', '.join(f for f, _ in bag.files)} in {repo}")
    return names


def download(url: str, dest: Path, sha256_prefix: str | None, *, label: str) -> Path:
    """``url`` to ``dest`` through a temporary name in its folder, checked against
    ``sha256_prefix`` (a whole sha256 checks the whole digest) before it is renamed into
    place: a corrupt or partial download leaves nothing. ``ModelError`` (one line) else."""
    import torch.hub

    dest = Path(dest)
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        torch.hub.download_url_to_file(url, part, hash_prefix=sha256_prefix, progress=False)
        os.chmod(part, 0o666 & ~_umask())
        os.replace(part, dest)
    except Exception as exc:  # noqa: BLE001 - one line for a person, nothing left
        Path(part).unlink(missing_ok=True)
        raise ModelError(f"{label}: cannot download {url}: {_reason(exc)}") from None
    return dest


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "reason", "") or exc).strip()
    if "invalid hash value" in text:
        return "the download does not match its checksum (corrupted or not the model)"
    return text or type(exc).__name__


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _load(name: str, repo: Path) -> None:
    from demucs.pretrained import get_model

    try:
        get_model(name, repo=Path(repo))
    except BaseException as exc:  # demucs exits (SystemExit) on a broken repo
        raise ModelError(f"{name}: the model in {repo} does not load: {exc}") from None


@dataclass(frozen=True)
class Installed:
    name: str
    files: tuple[str, ...]
    missing: tuple[str, ...]  # signatures without weights
    size_bytes: int


def installed(repo: Path) -> list[Installed]:
    """The bags (``<name>.yaml``) and single models (``<sig>-<hash>.th`` no bag names) in
    ``repo``, each with its files and what is missing."""
    import yaml

    repo = Path(repo)
    if not repo.is_dir():
        return []
    weights = {p.name.split("-", 1)[0].split(".")[0]: p for p in repo.glob("*.th")}
    used: set[str] = set()
    out = []
    for bag_yaml in sorted(repo.glob("*.yaml")):
        if bag_yaml.with_suffix(".ckpt").is_file():
            continue  # a RoFormer model (imaker.roformer.is_roformer), not a bag
        try:
            sigs = [str(s) for s in yaml.safe_load(bag_yaml.read_text())["models"]]
        except Exception:  # noqa: BLE001 - a foreign yaml is listed as incomplete
            sigs = []
        have = [weights[s] for s in sigs if s in weights]
        used.update(sigs)
        out.append(Installed(bag_yaml.stem, tuple(p.name for p in have),
                             tuple(s for s in sigs if s not in weights) or (() if sigs else ("?",)),
                             sum(p.stat().st_size for p in have)))
    for sig, path in sorted(weights.items()):
        if sig not in used:
            out.append(Installed(sig, (path.name,), (), path.stat().st_size))
    return out


def describe(entry: Installed, repo: Path) -> dict:
    """What ``imaker models list`` shows of a complete demucs model (``installed``) in ``repo``: its
    architecture (the network's class; a bag's members'), stems, the sha256 of each weight
    file, and whether it loads (``error``: the one line saying why not). Loads it on the CPU."""
    from .fsutil import sha256_file
    from .separation import SeparationError, load_model

    info = {"architecture": None, "stems": [],
            "sha256": [sha256_file(Path(repo) / f) for f in entry.files],
            "loads": False, "error": None}
    try:
        loaded = load_model(entry.name, repo, "cpu")
    except SeparationError as exc:
        info["error"] = " ".join(str(exc).split())
        return info
    except Exception as exc:  # noqa: BLE001 - torch's own error on a damaged file: one line
        info["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return info
    members = getattr(loaded.model, "models", None) or [loaded.model]
    names = sorted({type(m).__name__ for m in members})
    info.update(architecture="+".join(names), stems=list(loaded.sources), loads=True)
    return info


def missing(name: str, repo: Path) -> str | None:
    """None when ``repo`` has the model ``name`` (a complete bag or a single model), else
    a message naming the model, the folder and the command that fetches it."""
    for entry in installed(repo):
        if entry.name == name and not entry.missing:
            return None
    fetchable = name in known_names()
    how = (f"run `imaker models fetch {name}` (downloads it from demucs' servers)" if fetchable
           else f"{name!r} is not one of demucs' models ({', '.join(known_names())}): "
                "put its files there")
    return (f"demucs model {name!r} is not in the model repo {repo} (DEMUCS_MODEL_REPO): "
            f"{how}; offline, `imaker dev-model DIR` writes a tiny test model for trials")


def main(argv: list[str] | None = None) -> int:
    """Standalone use (the image build): ``python imaker/models.py fetch --repo DIR NAME...``."""
    ap = argparse.ArgumentParser(prog="models.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("names", nargs="+")
    f.add_argument("--repo", type=Path, required=True)
    f.add_argument("--url", default=None, help="a mirror of demucs' download root")
    args = ap.parse_args(argv)
    try:
        fetch(args.names, args.repo, root_url=args.url)
    except ModelError as exc:
        print(f"models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
