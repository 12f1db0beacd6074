"""``imaker`` command line.

    imaker ingest --once     one pass over all queues, each new track processed in-process
    imaker ingest            the same, repeated every --interval seconds
    imaker settings          print the effective settings
    imaker schema job|manifest   print a published JSON Schema
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .bundle import schema_path
from .settings import SettingsError, load_settings


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        local = Path("dagster_home")
        if (local / "dagster.yaml").is_file():
            os.environ["DAGSTER_HOME"] = str(local.resolve())
        else:
            raise SystemExit("imaker: set DAGSTER_HOME to a folder with a dagster.yaml "
                             "(the repository's dagster_home/ works)")
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return DagsterInstance.get()


def ingest_once(instance, settings, out=sys.stdout) -> int:
    """Register and process every ready bundle once. Returns the number of failed jobs."""
    from imaker_assets.definitions import build_defs
    from imaker_assets.partitions import tracks
    from imaker_assets.runtime import claim_alive

    from .queues import QueueStore

    store = QueueStore.from_settings(settings)
    store.ensure_dirs()
    for job_id, action in store.recover_stale(claim_alive(instance)):
        print(f"{job_id}: recovered a dead claim: {action}", file=out, flush=True)
    ready, invalid = store.scan()
    failures = 0
    for entry in invalid:
        store.reject(entry)
        print(f"{entry.path.name}: failed: {entry.reason}", file=out, flush=True)
        failures += 1
    if not ready and not invalid:
        print("no bundles waiting in " + ", ".join(str(p) for p in settings.queues.values()),
              file=out, flush=True)
        return 0
    job_def = build_defs(settings).resolve_job_def("ingest_track")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    seen: set[str] = set()
    for job in ready:
        if job.job_id in seen:
            print(f"{job.job_id}: another copy is queued in {job.queue}; left for the next pass",
                  file=out, flush=True)
            continue
        seen.add(job.job_id)
        if not instance.has_dynamic_partition(tracks.name, job.job_id):
            instance.add_dynamic_partitions(tracks.name, [job.job_id])
        result = job_def.execute_in_process(
            partition_key=job.job_id, instance=instance, raise_on_error=False, run_config=quiet,
            tags={"imaker/job_id": job.job_id, "imaker/queue": job.queue,
                  "imaker/trigger": "imaker-ingest"})
        if result.success:
            print(f"{job.job_id}: {settings.outputs_dir / job.job_id}", file=out, flush=True)
            continue
        failures += 1
        error = store.read_error(job.job_id)
        if error:
            reason = f"{error['stage']}: {error['error']}"
        else:
            events = [e for e in result.all_events if e.is_step_failure or e.is_failure]
            reason = events[0].message if events else "run failed"
        print(f"{job.job_id}: failed: {reason}", file=out, flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imaker", description="instrumental-maker")
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="process the bundles waiting in the queues")
    ing.add_argument("--once", action="store_true", help="one pass, then exit (1 if any failed)")
    ing.add_argument("--interval", type=float, default=10.0, help="seconds between passes")
    sub.add_parser("settings", help="print the effective settings as JSON")
    sch = sub.add_parser("schema", help="print a published JSON Schema")
    sch.add_argument("name", choices=["job", "manifest"])
    dev = sub.add_parser("dev-model", help="write a tiny random HTDemucs model repo (offline "
                                           "demos and tests; not musically useful)")
    dev.add_argument("path", type=Path)
    dev.add_argument("--name", default="tiny_htdemucs")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"imaker: {exc}", file=sys.stderr)
        return 2
    if args.command == "settings":
        print(json.dumps(settings.as_dict(), indent=2))
        return 0
    if args.command == "dev-model":
        from .devmodel import build_model_repo

        build_model_repo(args.path, args.name)
        print(f"DEMUCS_MODEL={args.name} DEMUCS_MODEL_REPO={args.path.resolve()}")
        return 0
    if args.command == "schema":
        print(schema_path(args.name).read_text(), end="")
        return 0
    instance = _instance()
    if args.once:
        return 1 if ingest_once(instance, settings) else 0
    while True:  # pragma: no cover - exercised by hand; the sensor is the long-running path
        ingest_once(instance, settings)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
