"""The Dagster daemon that ``imaker ingest`` starts when none serves the instance
(``operations.DaemonGuard``): ``dagster-daemon run`` over code servers that live as long as
it does, as ``dagster dev`` runs it.

Why not plain ``dagster-daemon run -w <python_module workspace>``: a daemon that manages the
code server of a ``python_module`` location itself replaces it every 60 s
(``dagster._daemon.controller.RELOAD_WORKSPACE_INTERVAL``: a new ``dagster api grpc``
process importing Dagster and loading the code location, while the old one finishes its
runs). Measured on 2 cores, an idle daemon and its code servers: 5.5 CPU-s a minute that
way, 3.6 this way (benchmarks/RESULTS.md). ``dagster dev`` and the compose stack run code
servers the daemon only connects to; this does the same with Dagster's own
``ProxyServerManager`` (what ``dagster dev`` starts its code servers with: it heartbeats
them and restarts one that died), then runs Dagster's daemon command in this process on a
workspace that points at them.

    python -m imaker_assets.ingest_daemon <workspace.yaml>

A SIGINT stops the daemon, then the code servers (``DaemonGuard.close`` waits for every
process of the group). Killed outright, the code servers stop by themselves once their
heartbeats stop (``--heartbeat``, set by ``ProxyServerManager``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import yaml
    from dagster import DagsterInstance
    from dagster._cli.proxy_server_manager import ProxyServerManager
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster._daemon.cli import run_command

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m imaker_assets.ingest_daemon <workspace.yaml>")
    with DagsterInstance.get() as instance, \
            ProxyServerManager(instance=instance,
                               workspace_load_target=WorkspaceFileTarget([args[0]]),
                               code_server_log_level="warning") as servers, \
            tempfile.TemporaryDirectory(prefix="imaker-daemon-") as tmp:
        served = Path(tmp) / "workspace.yaml"
        served.write_text(yaml.safe_dump({"load_from": servers.get_code_server_specs()}))
        # Dagster's `dagster-daemon run` (it returns on SIGINT, as the command exits 0)
        run_command.main(["-w", str(served)], prog_name="dagster-daemon run",
                         standalone_mode=False)


if __name__ == "__main__":
    main()
