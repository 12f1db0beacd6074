"""``imaker retrieve ...`` and ``imaker import ...``.

Wire into ``imaker/cli.py`` with :func:`add_parsers` (after the other sub-commands) and
dispatch with ``args.func(args, settings)``. Also runnable alone:
``python -m imaker.retrievers.cli retrieve youtube URL``.

Exit status: 0 when every target was queued, skipped or a duplicate; 1 when any failed or
was rejected; 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from ..settings import Settings, SettingsError, load_settings
from . import registry
from .base import Outcome, RetrieveContext, RetrieverError
from .youtube import MODES


def add_parsers(subparsers) -> None:
    """Add ``retrieve`` and ``import`` to an argparse sub-parsers object."""
    ret = subparsers.add_parser(
        "retrieve", help="download media as job bundles into the queues",
        description="Download media as job bundles into the queues. "
                    "`imaker retrieve --list` shows every retriever (built in and plugins).")
    ret.add_argument("--list", action="store_true", help="list the available retrievers")
    ret.set_defaults(func=cmd_retrieve, retriever=None)
    rsub = ret.add_subparsers(dest="retriever", metavar="RETRIEVER")

    yt = rsub.add_parser("youtube", help="YouTube / yt-dlp URLs, playlists, channels")
    yt.add_argument("targets", nargs="+", metavar="URL")
    yt.add_argument("--mode", choices=MODES, help="audio, video or both (default: YTDL_MODE)")
    yt.add_argument("--audio-format", help="default: YTDL_AUDIO_FORMAT")
    _common(yt)

    dz = rsub.add_parser("deezer", help="Deezer track/album/playlist URLs via deemix "
                                        "(needs DEEZER_ARL and the [deezer] extra)")
    dz.add_argument("targets", nargs="+", metavar="URL")
    dz.add_argument("--bitrate", default="mp3_320", choices=["flac", "mp3_320", "mp3_128"])
    _common(dz)

    for name, info in registry.available().items():
        if name in ("youtube", "deezer", "import"):
            continue
        p = rsub.add_parser(name, help=f"plugin from {info.origin}")
        p.add_argument("targets", nargs="+", metavar="TARGET")
        _common(p)

    imp = subparsers.add_parser(
        "import", help="queue audio files or folders (QUEUE_OTHER)",
        description="Turn audio files or folder trees into job bundles in QUEUE_OTHER, with "
                    "artist/album/title/cover from the tags (else Artist/Album/Title paths).")
    imp.add_argument("targets", nargs="+", metavar="PATH")
    imp.add_argument("--move", action="store_true",
                     help="move the files into the bundles instead of copying them")
    _common(imp)
    imp.set_defaults(func=cmd_import, retriever="import")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="queue sources that were queued before")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="retriever option (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per outcome")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RetrieverError(f"--option {item!r}: expected KEY=VALUE")
        opts[key.replace("-", "_")] = value
    for key in ("mode", "audio_format", "bitrate", "move"):
        value = getattr(args, key, None)
        if value not in (None, False):
            opts[key] = value
    return opts


def run_retriever(name: str, targets: list[str], settings: Settings, *, force: bool = False,
                  options: dict[str, Any] | None = None, log=lambda msg: None,
                  on_outcome=lambda outcome: None,
                  provenance: dict[str, Any] | None = None) -> list[Outcome]:
    """Run retriever ``name`` over ``targets`` (what the CLI and the Dagster job call)."""
    ctx = RetrieveContext(settings, force=force, log=log, on_outcome=on_outcome,
                          provenance=dict(provenance or {}))
    retriever = registry.get(name)(ctx, **(options or {}))
    return retriever.retrieve(targets)


def _printer(as_json: bool, out: TextIO):
    def show(o: Outcome) -> None:
        print(json.dumps(o.to_dict(), ensure_ascii=False) if as_json else o.line(), file=out,
              flush=True)
    return show


def cmd_retrieve(args: argparse.Namespace, settings: Settings | None = None,
                 out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.list or not args.retriever:
        if not args.list:
            print("imaker retrieve: name a retriever (or --list)", file=sys.stderr)
        for name, origin, desc in registry.describe_all():
            print(f"{name:<10} {origin:<20} {desc}", file=out)
        return 0 if args.list else 2
    return _run(args, args.retriever, settings, out)


def cmd_import(args: argparse.Namespace, settings: Settings | None = None,
               out: TextIO | None = None) -> int:
    return _run(args, "import", settings, out)


def _run(args, name: str, settings: Settings | None, out: TextIO | None) -> int:
    out = out or sys.stdout
    try:
        settings = settings or load_settings()
        outcomes = run_retriever(name, list(args.targets), settings, force=args.force,
                                 options=_options(args), on_outcome=_printer(args.json, out),
                                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (RetrieverError, SettingsError) as exc:
        print(f"imaker {'import' if name == 'import' else 'retrieve ' + name}: {exc}",
              file=sys.stderr)
        return 2
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imaker", description="instrumental-maker retrievers")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
