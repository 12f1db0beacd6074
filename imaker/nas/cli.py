"""``imaker nas-sync [--once|--watch]``: the standalone NAS sync service.

Scans ``OUTPUTS_DIR/*/manifest.json`` for jobs that are not synced yet or out of date
(new manifest, changed routes, last sync failed) and syncs them with the same code as the
``nas_copy`` asset. Wire it into ``imaker.cli`` with ``add_parser(subparsers)`` (the
handler is set as ``func``) or call ``main(argv)`` directly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import NasConfigError
from .sync import resolve_config, sync_all

log = logging.getLogger("imaker.nas")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="one pass over all outputs, then exit (default)")
    mode.add_argument("--watch", action="store_true",
                      help="keep scanning every --interval seconds until interrupted")
    parser.add_argument("--interval", type=float, default=30.0,
                        help="seconds between passes with --watch (default 30)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: $NAS_SYNC_CONFIG_PATH); also enables sync")
    parser.add_argument("--outputs", type=Path, default=None,
                        help="outputs folder (default: $OUTPUTS_DIR)")
    parser.add_argument("--force", action="store_true",
                        help="check every job, also those whose sync.json is up to date")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``nas-sync`` to an ``argparse`` subparsers object."""
    return _configure(subparsers.add_parser(
        "nas-sync", help="copy finished jobs' artifacts to the NAS routes of the config",
        description=__doc__.split("\n\n")[1]))


def run(args: argparse.Namespace, settings=None, out=None) -> int:
    """Handler: 0 when everything synced (or sync is disabled), 1 when a job failed,
    2 for a bad configuration. ``settings``: as ``imaker`` loaded them (and applied their
    ``UMASK``); None: read here, and ``UMASK`` applied here."""
    out = out or sys.stdout
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if settings is None:
        from ..fsutil import apply_umask
        from ..settings import SettingsError, load_settings

        try:
            settings = load_settings()
        except SettingsError as exc:
            print(f"imaker nas-sync: {exc}", file=sys.stderr)
            return 2
        apply_umask(settings.paths.umask)
    enabled = settings.nas.enabled or args.config is not None
    try:
        config, reason = resolve_config(enabled, args.config or settings.nas.config_path)
    except NasConfigError as exc:
        print(f"imaker nas-sync: {exc}", file=sys.stderr)
        return 2
    if config is None:
        print(f"warning: {reason}; nothing to do", file=out, flush=True)
        return 0
    outputs = args.outputs or settings.paths.outputs_dir
    if not args.watch:
        results = sync_all(outputs, config, once=True, force=args.force, log=log)
        for res in results:
            print(res.summary(), file=out, flush=True)
            for art in res.failures:
                print(f"  {art.path}: {art.message}", file=out, flush=True)
        if not results:
            print(f"all jobs in {outputs} are synced", file=out, flush=True)
        return 1 if any(r.status == "failed" for r in results) else 0

    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread
            pass
    print(f"watching {outputs} every {args.interval:g} s (Ctrl-C stops)", file=out, flush=True)
    try:
        while not stop.is_set():
            for res in sync_all(outputs, config, once=True, force=args.force, log=log,
                                stop=stop):
                print(res.summary(), file=out, flush=True)
            stop.wait(args.interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="imaker nas-sync",
                                                description=__doc__.split("\n\n")[1]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
