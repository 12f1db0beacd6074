"""``imaker`` command line.

    imaker ingest --once     claim every waiting bundle and wait until each is processed by
                             its own `ingest_track` Dagster run (the daemon's run queue; the
                             runs call the separation service, they never load the model)
    imaker ingest            the same, repeated every --interval seconds
    imaker retry JOB_ID... | --failed
                             put failed bundles back into their queue
    imaker backfill --variants drums_only [--track ID ...] [--tracks-per-run N]
                             re-mix variants from stored stems (no separation),
                             several tracks per Dagster run
    imaker forget JOB_ID [--outputs]
                             delete a track's partition and stored stems
    imaker retrieve youtube URL... [--mode audio|video|both]   (see docs/retrievers.md)
    imaker retrieve deezer URL... | imaker retrieve --list | imaker import PATH...
    imaker nas-sync [--once|--watch]   copy finished jobs to their NAS routes
    imaker separator serve [--host H] [--port P]
                             the separation service (holds the model for every run)
    imaker media serve [--host H] [--port P]
                             the media server: library page, variants, sources (HTTP Range)
    imaker settings [--json | --get NAME]
                             the effective settings and where each comes from (.env,
                             environment, default)
    imaker schema job|manifest   print a published JSON Schema
    imaker models fetch [NAME...] | imaker models list
                             demucs weights in DEMUCS_MODEL_REPO
    imaker dev-model PATH    a tiny random model repo (offline tests and demos)
    imaker dev-song DIR [--seconds S] [--seed N] [--count K] [--queue Q]
                             songs with known stems (MUSDB18-HQ layout) for tests/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .bundle import schema_path
from .settings import (SettingsError, env_example, explain, export_dagster_env, load_env_file,
                       load_settings, markdown_table, origin)


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        local = Path("dagster_home")
        if (local / "dagster.yaml").is_file():
            os.environ["DAGSTER_HOME"] = str(local.resolve())
        else:
            raise SystemExit("imaker: set DAGSTER_HOME to a folder with a dagster.yaml "
                             "(the repository's dagster_home/ works)")
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    from contextlib import nullcontext

    from filelock import FileLock

    # Dagster creates (and stamps) a new sqlite instance's databases in the first process
    # that opens it; two at once can stamp one twice, which breaks the instance for good
    # ("alembic_version has more than one head", dagster-io/dagster#27390). imaker
    # processes open it one at a time; the daemon `imaker ingest` starts comes after.
    # (A read-only DAGSTER_HOME, as in the compose images, holds a Postgres instance.)
    writable = os.access(home, os.W_OK)
    with FileLock(str(home / ".imaker-instance.lock")) if writable else nullcontext():
        return DagsterInstance.get()


def _models(settings, args) -> int:
    from . import models
    from .roformer import install

    repo = settings.separation.model_repo
    if args.models_command == "list":
        entries = models.installed(repo)
        rofos = install.listing(repo)
        if not entries and not rofos:
            print(f"no models in {repo} (imaker models fetch [NAME] downloads "
                  f"{settings.separation.model}; known: {', '.join(models.known_names())}; "
                  f"RoFormer: {', '.join(install.CATALOGUE)})")
        demucs_ok = True
        for e in entries:
            mark = " (DEMUCS_MODEL)" if e.name == settings.separation.model else ""
            if e.missing:
                demucs_ok = False
                print(f"{e.name}{mark}: demucs, incomplete (missing {', '.join(e.missing)}), "
                      f"{len(e.files)} file(s), {e.size_bytes / 1e6:.1f} MB in {repo}")
                continue
            info = models.describe(e, repo)
            demucs_ok = demucs_ok and info["loads"]
            state = "loads" if info["loads"] else f"does not load: {info['error']}"
            print(f"{e.name}{mark}: demucs, complete, {info['architecture'] or '?'}, stems "
                  f"{','.join(info['stems']) or '?'}, {len(e.files)} file(s), "
                  f"{e.size_bytes / 1e6:.1f} MB in {repo}, sha256 "
                  f"{'+'.join(info['sha256'])}, {state}")
        for r in rofos:
            mark = " (INSTRUMENTAL_MODEL)" if r["name"] in settings.separation.instrumental_model else ""
            state = "loads" if r["loads"] else f"does not load: {r['error']}"
            print(f"{r['name']}{mark}: roformer, {r['architecture'] or '?'}, stems "
                  f"{','.join(r['stems']) or '?'}, {r['size_bytes'] / 1e6:.1f} MB, sha256 "
                  f"{r['sha256']}, {state}")
        return 0 if demucs_ok and all(r["loads"] for r in rofos) else 1
    if args.models_command == "add":
        try:
            info = install.add(args.ckpt, args.yaml, repo, name=args.name)
        except install.InstallError as exc:
            print(f"imaker: {exc}", file=sys.stderr)
            return 1
        print(f"{info['name']}: {info['architecture']}, stems {', '.join(info['stems'])}, "
              f"sha256 {info['sha256']}, added to {repo}")
        return 0
    names = args.names or [settings.separation.model]
    if args.if_missing:
        names = [n for n in names if models.missing(n, repo) is not None
                 and not (n in install.CATALOGUE and (repo / f"{n}.ckpt").is_file())]
        if not names:
            return 0
    try:
        for name in [n for n in names if n in install.CATALOGUE]:
            install.fetch(name, repo, root_url=args.url, sha256=args.sha256)
        demucs = [n for n in names if n not in install.CATALOGUE]
        if demucs:
            models.fetch(demucs, repo, root_url=args.url)
    except (models.ModelError, install.InstallError) as exc:
        print(f"imaker: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_settings(settings, args) -> int:
    if args.get:
        print(os.environ.get(args.get, ""))
        return 0
    if args.export:
        import shlex

        for name in args.export:
            if name in os.environ:
                print(f"export {name}={shlex.quote(os.environ[name])}")
        return 0
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    if args.env_example:
        print(env_example(), end="")
        return 0
    if args.json:
        print(json.dumps(settings.env_values(), indent=2))
        return 0
    path, rows = explain()
    print(f"# settings file: {path or 'none'} (IMAKER_ENV_FILE, else ./.env, else the "
          "checkout's .env; the environment overrides it)")
    width = max(len(name) for name, _, _ in rows)
    for name, value, where in rows:
        print(f"{name:<{width}} = {'' if value is None else value}  # {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imaker", description="instrumental-maker")
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="process the bundles waiting in the queues")
    ing.add_argument("--once", action="store_true", help="one pass, then exit (1 if any failed)")
    ing.add_argument("--interval", type=float, default=10.0, help="seconds between passes")
    bf = sub.add_parser("backfill", help="re-mix variants + manifest of existing tracks from "
                                         "their stored stems (never re-separates)")
    bf.add_argument("--variants", default="", help="comma-separated variants to add, e.g. "
                                                   "drums_only (default: just re-mix)")
    bf.add_argument("--track", action="append", dest="tracks", help="only this job id (repeat)")
    bf.add_argument("--tracks-per-run", type=int, metavar="N", default=None,
                    help="tracks re-mixed per Dagster run (default: the assets' backfill "
                         "policy, as in a UI backfill; 1: one run per track)")
    fg = sub.add_parser("forget", help="delete a track's partition, stored source and stems")
    fg.add_argument("job_id")
    fg.add_argument("--outputs", action="store_true", help="also delete outputs/<job_id>/")
    rt = sub.add_parser("retry", help="put failed bundles back into their queue (error.json "
                                      "kept as history)")
    rt.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    rt.add_argument("--failed", action="store_true", help="every bundle in archive/failed/")
    st = sub.add_parser("settings", help="the effective settings and where each value comes "
                                         "from (environment, the .env file, default)")
    st.add_argument("--json", action="store_true", help="the settings as JSON (by variable)")
    st.add_argument("--markdown", action="store_true",
                    help="every setting as the README's table (made from imaker/settings.py)")
    st.add_argument("--env-example", action="store_true",
                    help="every setting as a commented .env template (.env.example)")
    st.add_argument("--get", metavar="NAME", help="print one variable's value (environment, "
                                                  "else the .env file; empty if unset)")
    st.add_argument("--export", nargs="+", metavar="NAME",
                    help="`export NAME=value` lines (shell-quoted) for the variables set in "
                         "the environment or the .env file, and the effective value of those "
                         "dagster.yaml reads, e.g. MAX_CONCURRENT_RUNS (scripts/serve.sh)")
    from .retrievers.cli import add_parsers as add_retriever_parsers

    add_retriever_parsers(sub)  # retrieve youtube|deezer|--list, import
    from .nas.cli import add_parser as add_nas_sync

    add_nas_sync(sub)  # nas-sync --once|--watch
    sep = sub.add_parser("separator", help="the separation service (holds the demucs model "
                                           "and serves the `stems` step of every run)")
    sep_sub = sep.add_subparsers(dest="separator_command", required=True)
    serve = sep_sub.add_parser("serve", help="run the service (HTTP; GET /health, POST /separate)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (compose: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=None,
                       help="port (default SEPARATOR_PORT, 8765; when another install's service "
                            "holds it, the port this checkout's processes use instead)")
    serve.add_argument("--concurrency", type=int, default=None,
                       help="separations at once (default SEPARATOR_CONCURRENCY: cores on CPU, by GPU "
                            "memory on CUDA)")
    serve.add_argument("--idle-exit", type=float, default=None,
                       help="exit after this many idle seconds (the auto-started service)")
    serve.add_argument("--preload", action="store_true",
                       help="load DEMUCS_MODEL and compile its backend (on CUDA: one 60 s "
                            "separation) before answering: a health check then means ready")
    med = sub.add_parser("media", help="listen from the UI: the static media server for "
                                       "OUTPUTS_DIR and LIBRARY_DIR (HTTP Range)")
    med_sub = med.add_subparsers(dest="media_command", required=True)
    mserve = med_sub.add_parser("serve", help="serve the library page (/), /outputs/ and /library/")
    mserve.add_argument("--host", default=None, help="address (default MEDIA_HOST, 127.0.0.1; "
                                                     "compose: 0.0.0.0)")
    mserve.add_argument("--port", type=int, default=None, help="port (default MEDIA_PORT, 8766)")
    sch = sub.add_parser("schema", help="print a published JSON Schema")
    sch.add_argument("name", choices=["job", "manifest"])
    mdl = sub.add_parser("models", help="demucs and RoFormer models in DEMUCS_MODEL_REPO "
                                        "(default $IMAKER_DATA/models)")
    mdl_sub = mdl.add_subparsers(dest="models_command", required=True)
    mf = mdl_sub.add_parser("fetch", help="download and verify models (default: DEMUCS_MODEL): "
                                          "demucs' through demucs' own download table, "
                                          "RoFormer ones from imaker's short catalogue")
    mf.add_argument("names", nargs="*", metavar="NAME")
    mf.add_argument("--url", default=None, help="a mirror of demucs' download root "
                                                "(https://dl.fbaipublicfiles.com/demucs/), or "
                                                "of a RoFormer model's files (by file name)")
    mf.add_argument("--sha256", default=None, help="the RoFormer checkpoint's sha256, where "
                                                   "the catalogue does not know it")
    mf.add_argument("--if-missing", action="store_true",
                    help="only when the repo lacks them (README command 1)")
    mdl_sub.add_parser("list", help="the models in the repo: family, architecture, stems, "
                                    "size, sha256, whether each loads (exit 1 if one does not)")
    ma = mdl_sub.add_parser("add", help="import a RoFormer checkpoint + yaml config you "
                                        "downloaded (checked: loads strict, runs one window)")
    ma.add_argument("ckpt", type=Path)
    ma.add_argument("yaml", type=Path)
    ma.add_argument("--name", default=None, help="its name in the repo (INSTRUMENTAL_MODEL; "
                                                 "default: the checkpoint's file name)")
    ev = sub.add_parser("eval", help="separation quality on a MUSDB18-HQ-layout folder: "
                                     "BSS-eval v4 median SDR (museval) and multisong SDR per "
                                     "stem and for the instrumental")
    ev.add_argument("path", type=Path, metavar="DIR")
    ev.add_argument("--model", action="append", dest="models", metavar="NAME",
                    help="a model in DEMUCS_MODEL_REPO (repeat; default: INSTRUMENTAL_MODEL's "
                         "and DEMUCS_MODEL)")
    ev.add_argument("--write", type=Path, default=None, metavar="FILE",
                    help="append the results table to FILE (e.g. benchmarks/RESULTS.md)")
    dev = sub.add_parser("dev-model", help="write a tiny random HTDemucs model repo (offline "
                                           "demos and tests; not musically useful)")
    dev.add_argument("path", type=Path)
    dev.add_argument("--name", default="tiny_htdemucs")
    dsong = sub.add_parser("dev-song", help="compose songs from a seed and render each stem "
                                            "with FluidSynth (MUSDB18-HQ layout: mixture.wav "
                                            "+ drums/bass/other/vocals.wav; tests, benchmarks)")
    dsong.add_argument("path", type=Path, help="folder for the song folders")
    dsong.add_argument("--seconds", type=float, default=30.0, help="length of each song")
    dsong.add_argument("--seed", type=int, default=0, help="seed of the first song")
    dsong.add_argument("--count", type=int, default=1, help="songs, seeds SEED .. SEED+COUNT-1")
    dsong.add_argument("--prefix", default="devsong", help="song folders are PREFIX_<seed>")
    dsong.add_argument("--soundfont", type=Path, default=None,
                       help="a General MIDI .sf2 (default: pretty-midi's TimGM6mb.sf2)")
    dsong.add_argument("--workers", type=int, default=1, help="stems rendered at once (threads)")
    dsong.add_argument("--processes", type=int, default=1, help="songs rendered at once")
    dsong.add_argument("--queue", type=Path, default=None,
                       help="also queue each song's mixture as a job bundle in this queue folder")
    dsong.add_argument("--format", choices=["flac", "m4a", "wav"], default="flac",
                       help="the queued bundle's audio (with --queue)")
    args = parser.parse_args(argv)
    try:
        load_env_file()  # before anything reads the environment (children inherit it)
        settings = load_settings()
        # what dagster.yaml reads (MAX_CONCURRENT_RUNS as a number): for the instance this
        # process opens, the daemon it may start, and `settings --export` (scripts/serve.sh)
        export_dagster_env(settings)
    except SettingsError as exc:
        where = origin(exc.name) if exc.name else "default"
        print(f"imaker: {exc}" + (f" (set in {where})" if where not in ("default", "environment")
                                  else ""), file=sys.stderr)
        return 2
    from .fsutil import apply_umask

    apply_umask(settings.paths.umask)  # every command, nas-sync included
    if args.command == "nas-sync":
        return args.func(args, settings)
    if getattr(args, "func", None):  # retrievers
        return args.func(args, settings)
    if args.command == "settings":
        return _print_settings(settings, args)
    if args.command == "models":
        return _models(settings, args)
    if args.command == "eval":
        from . import evaluate

        sep = settings.separation
        names = args.models or [*sep.instrumental_model, sep.model]
        try:
            results = evaluate.evaluate(args.path, names, sep)
        except Exception as exc:  # noqa: BLE001 - one line for a person
            print(f"imaker: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        table = evaluate.markdown(results, args.path)
        if not evaluate.has_museval():
            table += "\n(BSS-eval v4 left out: `pip install museval`)\n"
        print(table, end="")
        if args.write:
            from .fsutil import atomic_path

            before = args.write.read_text(encoding="utf-8") if args.write.is_file() else ""
            with atomic_path(args.write) as tmp:
                Path(tmp).write_text(before + "\n" + table, encoding="utf-8")
        return 0
    if args.command == "dev-model":
        from .devmodel import build_model_repo

        build_model_repo(args.path, args.name)
        print(f"DEMUCS_MODEL={args.name} DEMUCS_MODEL_REPO={args.path.resolve()}")
        return 0
    if args.command == "dev-song":
        from . import devsong

        try:
            folders = devsong.generate(args.path, count=args.count, seed=args.seed,
                                       seconds=args.seconds, prefix=args.prefix,
                                       soundfont=args.soundfont, workers=args.workers,
                                       processes=args.processes)
            for folder in folders:
                info = json.loads((folder / "song.json").read_text())
                line = f"{folder}: {info['seconds']:g} s, {info['tempo_bpm']:g} bpm, {info['key']}"
                if args.queue:
                    line += f" -> {devsong.queue_song(folder, args.queue, fmt=args.format)}"
                print(line)
        except devsong.DevSongError as exc:
            print(f"imaker: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "retry":
        from .bundle import job_id_from_folder
        from .queues import JobNotFound, QueueStore

        store = QueueStore.from_settings(settings)
        ids = list(args.job_ids)
        if args.failed and store.failed_dir.is_dir():
            ids += sorted(j for j in (job_id_from_folder(p.name) for p in store.failed_dir.iterdir())
                          if j is not None)
        if not ids:
            print("imaker retry: name JOB_IDs or --failed", file=sys.stderr)
            return 2
        bad = 0
        for job_id in dict.fromkeys(ids):
            try:
                print(f"{job_id}: queued again in {store.requeue_failed(job_id).parent}")
            except (JobNotFound, OSError) as exc:
                print(f"{job_id}: {exc}", file=sys.stderr)
                bad += 1
        return 1 if bad else 0
    if args.command == "separator":
        from .separator.client import SeparatorClient
        from .separator.service import Preload, serve as serve_separator

        client = SeparatorClient.from_settings(settings)
        from .variants import selected_variants

        preload = Preload(separation=settings.separation, variants=selected_variants(
            None, no_drums=settings.output.no_drums, drums_only=settings.output.drums_only)
        ) if args.preload else None
        port, lock = args.port, None
        if port is None and not settings.service.url:
            # this checkout's service (scripts/serve.sh): SEPARATOR_PORT, or the port its
            # processes use instead while another install's service holds that one; the
            # start lock is held until it listens, so they wait for it instead of starting one
            lock = client.start_lock()
            lock.acquire()
            if client.find_running():
                lock.release()
                print(f"imaker: this checkout's separation service already runs on "
                      f"{client.address}", file=sys.stderr)
                return 0
            port = client.port_to_start()
        serve_separator(args.host, port or settings.service.port,
                        concurrency=args.concurrency or settings.service.concurrency,
                        idle_exit_s=args.idle_exit, preload=preload,
                        identity=client.identity(),
                        on_listening=lock.release if lock is not None else None)
        return 0
    if args.command == "media":
        from . import media

        media.serve(args.host or settings.media.host, args.port or settings.media.port,
                    settings.paths.outputs_dir, settings.paths.library_dir)
        return 0
    if args.command == "schema":
        print(schema_path(args.name).read_text(), end="")
        return 0
    from imaker_assets import operations

    instance = _instance()
    if args.command == "backfill":
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        try:
            return 1 if operations.backfill_variants(
                instance, settings, names, args.tracks,
                tracks_per_run=args.tracks_per_run) else 0
        except ValueError as exc:
            print(f"imaker: {exc}", file=sys.stderr)
            return 2
    if args.command == "forget":
        operations.forget(instance, settings, args.job_id, outputs=args.outputs)
        print(f"{args.job_id}: forgotten" + (" (outputs deleted)" if args.outputs else ""))
        return 0
    if args.once:
        return 1 if operations.ingest_once(instance, settings) else 0
    while True:  # pragma: no cover - exercised by hand; the sensor is the long-running path
        operations.ingest_once(instance, settings)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
