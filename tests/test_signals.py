"""Signal dispositions survive in-process Dagster execution (issue 23, point 11).

Dagster's in-process execution ends by pointing SIGTERM at SIGINT's handler
(``dagster._utils.interrupts.setup_interrupt_handlers``, from ``capture_interrupts``). In a
process started in the background (SIGINT ignored: `imaker ingest &` in a script, nohup, a
CI harness) SIGTERM was then ignored for good — by the process and by every process it
started afterwards (an ignored signal survives exec, and bash cannot trap it)."""

import re
import signal
import subprocess

from dagster import DagsterInstance

from imaker.settings import load_settings
from imaker_assets.operations import refresh_catalog


def _ignored_by_a_child() -> set[int]:
    """The signals a process started now has ignored (its /proc status, SigIgn)."""
    status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True,
                            check=True).stdout
    mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def test_imakers_in_process_runs_leave_sigterm_as_it_was(imaker_env):
    # as in a process started in the background: SIGINT ignored, SIGTERM at its default
    # (conftest's autouse fixture puts them back after the test)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # `imaker ingest`, `backfill` and `forget` materialize the catalog in-process
    assert refresh_catalog(DagsterInstance.get(), load_settings())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.SIGTERM not in _ignored_by_a_child()
