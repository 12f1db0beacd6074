"""Fetch demucs model weights into a local model repo at image build time.

    python docker/fetch_models.py --out /models htdemucs [htdemucs_ft ...]
    python docker/fetch_models.py --print htdemucs        # list the URLs, download nothing

Writes ``<sig>-<hash>.th`` for every model of each bag and ``<name>.yaml`` (copied from
demucs' own remote table), the layout ``DEMUCS_MODEL_REPO`` / ``demucs --repo`` reads, then
loads each bag from that folder (no network) to prove the repo is complete. Hashes are
checked by torch against the hash prefix in the file name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def plan(names: list[str]) -> list[tuple[str, Path, list[tuple[str, str]]]]:
    """[(bag name, its yaml in the demucs package, [(file name, url), ...])]"""
    import yaml
    from demucs import pretrained

    remote = pretrained._parse_remote_files(pretrained.REMOTE_ROOT / "files.txt")
    out = []
    for name in names:
        bag_yaml = pretrained.REMOTE_ROOT / f"{name}.yaml"
        if not bag_yaml.is_file():
            known = sorted(p.stem for p in pretrained.REMOTE_ROOT.glob("*.yaml"))
            raise SystemExit(f"unknown demucs model {name!r}; known: {', '.join(known)}")
        sigs = yaml.safe_load(bag_yaml.read_text())["models"]
        files = []
        for sig in sigs:
            url = remote.get(sig)
            if url is None:
                raise SystemExit(f"{name}: no download for model {sig}")
            files.append((url.rsplit("/", 1)[1], url))
        out.append((name, bag_yaml, files))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+")
    ap.add_argument("--out", type=Path, default=Path("/models"))
    ap.add_argument("--print", dest="only_print", action="store_true")
    args = ap.parse_args(argv)
    bags = plan(args.names)
    if args.only_print:
        for name, _, files in bags:
            for fname, url in files:
                print(f"{name}\t{fname}\t{url}")
        return 0

    import torch.hub
    from demucs.pretrained import get_model

    args.out.mkdir(parents=True, exist_ok=True)
    for name, bag_yaml, files in bags:
        for fname, url in files:
            dest = args.out / fname
            if not dest.is_file():
                part = args.out / f".{fname}.part"
                torch.hub.download_url_to_file(url, str(part), hash_prefix=fname.rsplit("-", 1)[1].split(".")[0])
                part.rename(dest)
        shutil.copy(bag_yaml, args.out / f"{name}.yaml")
        get_model(name, repo=args.out)          # offline load from the repo: complete?
        print(f"{name}: {', '.join(f for f, _ in files)} -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
