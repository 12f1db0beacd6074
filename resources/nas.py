"""``NasResource``: where the NAS sync config is and whether sync is on.

Defaults come from ``NAS_SYNC_ENABLED`` and ``NAS_SYNC_CONFIG_PATH``; both can be
overridden per run in the launchpad.
"""

from __future__ import annotations

from dagster import ConfigurableResource

from imaker.nas import NasConfig, resolve_config
from imaker.settings import Settings, load_settings


class NasResource(ConfigurableResource):
    """NAS sync switch and config file (the YAML of ``docs/nas_sync.md``)."""

    enabled: bool = False
    config_path: str | None = None

    def config(self) -> tuple[NasConfig | None, str]:
        """The validated config, or None and why sync is skipped. Raises NasConfigError
        for a config file that exists but is invalid."""
        return resolve_config(self.enabled, self.config_path)


def build_nas_resource(settings: Settings | None = None) -> NasResource:
    s = settings or load_settings()
    return NasResource(enabled=s.nas_sync_enabled, config_path=str(s.nas_sync_config_path))
