"""The Dagster resource: every setting of ``imaker.settings``, as launchpad config.

``SettingsResource`` has one nested config per settings group (``paths``, ``output``,
``separation``, …), made from the group's pydantic model: the same fields, types, allowed
values and one-line docs, with the values the code location loaded (``.env`` and the
environment) as defaults. A run's launchpad config overrides any of them for that run:

    resources:
      settings:
        config:
          output: {audio_bitrate: 320k}

Assets, checks, sensors and ops read settings only through it (``settings.get()``), and
build the domain objects from what it returns (``QueueStore.from_settings``,
``Library.from_settings``, ``SeparatorClient.from_settings``). Secrets (``DEEZER_ARL``) are
not config: they come from the environment only and never show in the UI.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from dagster import Config, ConfigurableResource
from pydantic import Field, SecretStr, create_model

from imaker.settings import Settings, load_settings


def _config_type(annotation: Any, inner: bool = False) -> Any:
    """The Dagster config type of a settings field: paths as text, tuples as lists (of text
    where Dagster has no type for the items), the validators left to ``Settings`` (``get``
    validates the values again)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _config_type(get_args(annotation)[0], inner)
    if annotation is Path:
        return str
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        mapped = _config_type(inner[0]) if len(inner) == 1 else Union[tuple(map(_config_type, inner))]
        return typing.Optional[mapped] if len(inner) < len(get_args(annotation)) else mapped
    if origin is tuple:
        return list[_config_type(get_args(annotation)[0], inner=True)]
    if origin is Literal and inner:
        return str
    if origin is Literal or annotation in (str, int, float, bool):
        return annotation
    raise TypeError(f"no Dagster config type for settings of type {annotation!r}")


def _config_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_secret(info) -> bool:
    return SecretStr in (info.annotation, *get_args(info.annotation))


def _group_config(name: str, group: type, values: Any) -> type[Config]:
    fields = {fname: (_config_type(info.annotation),
                      Field(_config_value(getattr(values, fname)), description=info.description))
              for fname, info in group.model_fields.items() if not _is_secret(info)}
    model = create_model(f"{group.__name__}Settings", __base__=Config, **fields)
    model.__doc__ = group.__doc__
    return model


class SettingsResource(ConfigurableResource):
    """Every setting, by group (``imaker.settings``); made by ``settings_resource``."""

    base: ClassVar[Settings | None] = None  # the loaded settings: defaults and secrets

    def get(self) -> Settings:
        """The settings of this run: the loaded ones with this resource's config applied,
        validated by ``imaker.settings`` (a bad override fails with one line naming it)."""
        base = type(self).base or load_settings()
        return base.replace(**{g: getattr(self, g).model_dump() for g in Settings.groups()
                               if hasattr(self, g)})


def settings_resource(settings: Settings | None = None) -> SettingsResource:
    """A ``SettingsResource`` whose config defaults are ``settings`` (default: the
    environment's)."""
    settings = settings or load_settings()
    groups = {g: _group_config(g, cls, getattr(settings, g))
              for g, cls in Settings.groups().items()}
    cls = create_model("SettingsResource", __base__=SettingsResource,
                       **{g: (model, Field(default_factory=model, description=model.__doc__))
                          for g, model in groups.items()})
    cls.base = settings
    return cls()


def build_resources(settings: Settings | None = None) -> dict[str, ConfigurableResource]:
    return {"settings": settings_resource(settings)}
