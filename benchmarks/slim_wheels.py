#!/usr/bin/env python
"""Make the wheels in a folder smaller for carrying to an offline GPU machine (gpu_wheels.sh).

    python benchmarks/slim_wheels.py .gpu

* strips the debug information of every shared library (``strip --strip-debug``: sphn's
  extension is 82 MB with it, 5 MB without; sqlalchemy's, rpds', lameenc's, ...);
* drops dagster-webserver's UI bundle (``webapp/build/_next``, ``vendor``, the video:
  30 of its 37 MB). ``dagster dev`` still starts and serves the API (``/server_info``,
  ``/graphql``); the pages then load no scripts. The benchmark never opens the UI.

Each wheel is rewritten in place with a RECORD that matches its new contents.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DROP = {"dagster_webserver": ("dagster_webserver/webapp/build/_next/",
                              "dagster_webserver/webapp/build/vendor/",
                              "dagster_webserver/webapp/build/Dagster_world.mp4")}


def _strip(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib.so"
        path.write_bytes(data)
        if subprocess.run(["strip", "--strip-debug", str(path)], check=False).returncode != 0:
            return data
        out = path.read_bytes()
    return out if len(out) < len(data) else data


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim(wheel: Path) -> tuple[int, int]:
    dist = wheel.name.split("-")[0].lower()
    drop = DROP.get(dist, ())
    with zipfile.ZipFile(wheel) as zin:
        infos = zin.infolist()
        record_name = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        files: list[tuple[zipfile.ZipInfo, bytes]] = []
        changed = False
        for info in infos:
            if info.filename == record_name:
                continue
            if drop and info.filename.startswith(drop):
                changed = True
                continue
            data = zin.read(info)
            if ".so" in Path(info.filename).name and data[:4] == b"\x7fELF":
                new = _strip(data)
                changed |= new is not data
                data = new
            files.append((info, data))
    if not changed:
        return wheel.stat().st_size, wheel.stat().st_size
    before = wheel.stat().st_size
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for info, data in files:
        writer.writerow([info.filename, _digest(data), len(data)])
    writer.writerow([record_name, "", ""])
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info, data in files:
            new = zipfile.ZipInfo(info.filename, info.date_time)
            new.external_attr = info.external_attr
            new.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(new, data)
        rec = zipfile.ZipInfo(record_name, files[0][0].date_time)
        rec.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(rec, record.getvalue())
    os.replace(tmp, wheel)
    return before, wheel.stat().st_size


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu")
    for wheel in sorted(folder.glob("*.whl")):
        before, after = slim(wheel)
        if after != before:
            print(f"{wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
