"""``benchmarks/bench_run_floor.py`` (issue 22): Dagster's own CPU per track run, measured on
a copy of our ``ingest_track`` whose steps do nothing. The copy must keep our steps (the
script refuses to measure one that does not), and the script must measure real runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_run_floor  # noqa: E402


def test_the_noop_copy_has_our_ingest_track_steps_and_a_changed_one_is_refused(imaker_env,
                                                                              tmp_path):
    location = tmp_path / "noop_location.py"
    location.write_text(bench_run_floor.NOOP_LOCATION)
    steps = bench_run_floor.check_shape(location)
    assert {"source_audio", "stems", "variants", "variants_checks", "manifest",
            "manifest_manifest_matches_files", "nas_copy"} == steps

    # a copy that lost a step (as after a change to ours) is not measured
    fewer = bench_run_floor.NOOP_LOCATION.replace(
        "selection=[source_audio, stems, variants, manifest, nas_copy]",
        "selection=[source_audio, stems, variants, manifest]")
    assert fewer != bench_run_floor.NOOP_LOCATION
    location.write_text(fewer)
    with pytest.raises(SystemExit, match="update NOOP_LOCATION"):
        bench_run_floor.check_shape(location)


def test_the_benchmark_measures_runs_launched_by_the_ingest_daemon(imaker_env):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_run_floor.py"),
                           "--runs", "2", "--idle-seconds", "2", "--timeout", "240"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"CPU per run, whole tree minus idle: ([\d.]+) CPU-s \(run process ([\d.]+), "
                  r"daemon \+ code servers (-?[\d.]+); (\d+) run processes found\)", proc.stdout)
    assert m, proc.stdout
    per_run, run_process, found = float(m.group(1)), float(m.group(2)), int(m.group(4))
    assert found == 2
    # a run process imports Dagster and our code location and writes its events: never free
    assert 0.3 < run_process <= per_run + 0.5
