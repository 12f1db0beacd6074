import json
import os
from pathlib import Path

import jsonschema
import pytest

from conftest import write_bundle
from imaker.bundle import BundleError, JobBundle, schema_path

DATA = Path(__file__).parent / "data"


def test_published_schemas_are_valid_json_schemas():
    for name in ("job", "manifest"):
        schema = json.loads(schema_path(name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)


def test_contract_example_job_validates_and_round_trips():
    data = json.loads((DATA / "job.example.json").read_text())
    bundle = JobBundle.from_dict(data)
    assert bundle.youtube.duration_online_s == 213.0
    assert bundle.variants == ["instrumental", "no_drums"]
    assert bundle.to_dict() == data


def test_good_bundle_loads(tmp_path, source_m4a, cover_jpg):
    folder = write_bundle(tmp_path, "good1", source_m4a, cover=cover_jpg,
                          youtube={"video_id": "abc", "url": "https://example.invalid/abc",
                                   "channel": "C", "duration_online_s": 3.0, "upload_date": "20260101"})
    bundle = JobBundle.load(folder)
    assert bundle.job_id == "good1" and bundle.artist == "AC/DC"
    assert bundle.media_path("audio").read_bytes() == source_m4a.read_bytes()
    assert bundle.youtube.extra == {"upload_date": "20260101"}  # extensions are kept


def _hostile(tmp_path, source_m4a, case):
    """Build one hostile bundle; returns its folder."""
    q = tmp_path
    if case == "invalid_json":
        return write_bundle(q, "h1", source_m4a, _raw="{not json")
    if case == "not_object":
        return write_bundle(q, "h1", source_m4a, _raw="[1, 2]")
    if case == "nan":
        return write_bundle(q, "h1", source_m4a, _raw='{"schema_version": NaN}')
    if case == "unknown_version":
        return write_bundle(q, "h1", source_m4a, schema_version=99)
    if case == "missing_fields":
        return write_bundle(q, "h1", source_m4a, _raw=json.dumps({"schema_version": 1, "job_id": "h1"}))
    if case == "absolute_path":
        return write_bundle(q, "h1", source_m4a, audio="/etc/passwd")
    if case == "dotdot":
        return write_bundle(q, "h1", source_m4a, audio="../../etc/passwd")
    if case == "symlink_out":
        folder = write_bundle(q, "h1", None, audio="link.m4a")
        os.symlink(source_m4a, folder / "link.m4a")
        return folder
    if case == "jobjson_symlink":
        folder = write_bundle(q, "h1", source_m4a)
        target = tmp_path / "elsewhere.json"
        target.write_text((folder / "job.json").read_text())
        (folder / "job.json").unlink()
        os.symlink(target, folder / "job.json")
        return folder
    if case == "missing_file":
        return write_bundle(q, "h1", None)
    if case == "huge_field":
        return write_bundle(q, "h1", source_m4a, title="x" * 100_000)
    if case == "huge_file":
        return write_bundle(q, "h1", source_m4a, padding="y" * 400_000)
    if case == "id_mismatch":
        return write_bundle(q, "h1", source_m4a, folder="job_other")
    if case == "bad_variant":
        return write_bundle(q, "h1", source_m4a, variants=["instrumental", "karaoke"])
    if case == "deep_nesting":
        return write_bundle(q, "h1", source_m4a, _raw="[" * 100_000 + "]" * 100_000)
    raise AssertionError(case)


HOSTILE = {
    "invalid_json": "not valid JSON",
    "not_object": "must be a JSON object",
    "nan": "not valid JSON",
    "unknown_version": "unknown schema_version 99",
    "missing_fields": "missing required field(s): source_type, title, artist, audio",
    "absolute_path": "audio must be a path relative to the bundle",
    "dotdot": "must not contain '..'",
    "symlink_out": "outside the bundle",
    "jobjson_symlink": "symlink",
    "missing_file": "does not exist",
    "huge_field": "title",
    "huge_file": "larger than 256 KiB",
    "id_mismatch": "does not match its folder",
    "bad_variant": "karaoke",
    "deep_nesting": "job.json",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bundles_are_rejected_with_a_clear_message(tmp_path, source_m4a, case):
    folder = _hostile(tmp_path, source_m4a, case)
    with pytest.raises(BundleError) as err:
        JobBundle.load(folder)
    assert HOSTILE[case] in str(err.value)
    assert len(str(err.value)) < 1000  # a message for a person, not a dump
