"""The catalog asset: a table of every track, kept current automatically."""

import math

from dagster import (AssetExecutionContext, AssetSelection, AutomationCondition,
                     AutomationConditionSensorDefinition, DefaultSensorStatus, MaterializeResult,
                     MetadataValue, TableColumn, TableRecord, TableSchema, asset)

from imaker.catalog import COLUMNS, build_catalog, write_catalog
from imaker.media import page_url, write_library_page
from imaker.pipeline import Library
from resources import SettingsResource

from .assets import manifest
from .partitions import tracks

_SCHEMA = TableSchema(columns=[TableColumn(c, "string") for c in COLUMNS])


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


@asset(group_name="catalog", deps=[manifest], code_version="3", kinds={"pandas", "csv"},
       # refresh whenever any track's manifest changes; failed (missing) tracks do not block it
       automation_condition=AutomationCondition.eager().without(
           ~AutomationCondition.any_deps_missing()),
       description="Every processed track (artist, title, source, duration, variants, stems, "
                   "NAS state, model) as OUTPUTS_DIR/catalog.csv, and the library page "
                   "OUTPUTS_DIR/index.html (cover, players for the original and each variant; "
                   "served by `imaker media serve`). Built from manifests only.")
def catalog(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
    s = settings.get()
    lib = Library.from_settings(s)
    known = context.instance.get_dynamic_partitions(tracks.name)
    df = build_catalog(lib.outputs_dir, lib.stems_dir, known)
    path = write_catalog(df, lib.outputs_dir)
    page = write_library_page(lib.outputs_dir, lib.library_dir, known)
    records = [TableRecord({c: _cell(v) for c, v in row.items()})
               for row in df.head(500).to_dict("records")]
    return MaterializeResult(metadata={
        "dagster/row_count": len(df),
        "path": MetadataValue.path(str(path)),
        "library_page": MetadataValue.url(page_url(s.media.base_url)),
        "library_page_file": MetadataValue.path(str(page)),
        "tracks": MetadataValue.table(records=records, schema=_SCHEMA),
    })


#: evaluates the catalog's automation condition (Dagster's default automation sensor starts
#: stopped; this one runs as soon as the code location loads)
catalog_automation = AutomationConditionSensorDefinition(
    "catalog_automation", target=AssetSelection.assets(catalog),
    default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=15,
    description="Rebuilds the catalog after tracks are processed.")
