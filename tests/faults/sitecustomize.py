"""Fault injection for end-to-end tests (tests/test_cli.py), put on PYTHONPATH by the test
only: with ``IMAKER_FAULT_TRUNCATE_JOB=<job id>`` every Python process of the stack (the
run workers the daemon launches included) cuts that job's first variant to 1.5 s after
the variants step wrote it, as a broken encoder or disk would."""

import os

_JOB = os.environ.get("IMAKER_FAULT_TRUNCATE_JOB")

if _JOB:
    import subprocess

    from imaker import pipeline

    _real_make_variants = pipeline.make_variants

    def _truncating_make_variants(options, lib, job_id, *extra):
        meta = _real_make_variants(options, lib, job_id, *extra)
        if job_id == _JOB:
            path = lib.output_dir(job_id) / meta["artifacts"][0]["path"]
            cut = path.with_name(".cut" + path.suffix)
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(path), "-t",
                            "1.5", "-c", "copy", str(cut)], check=True)
            cut.replace(path)
        return meta

    pipeline.make_variants = _truncating_make_variants
