"""Which retrievers exist: the built-in ones plus every class registered under the
``imaker.retrievers`` entry-point group (``name = "package.module:Class"``)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points

from .base import Retriever, RetrieverError

GROUP = "imaker.retrievers"
BUILTIN = {
    "youtube": "imaker.retrievers.youtube:YouTubeRetriever",
    "deezer": "imaker.retrievers.deezer:DeezerRetriever",
    "import": "imaker.retrievers.local:ImportRetriever",
}


@dataclass(frozen=True)
class RetrieverInfo:
    name: str
    value: str  # "module:Class"
    origin: str  # "built-in" or the distribution that registered it

    def load(self) -> type[Retriever]:
        module, _, attr = self.value.partition(":")
        try:
            obj = import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, not fatal
            raise RetrieverError(f"retriever {self.name!r} ({self.value}) cannot be loaded: "
                                 f"{type(exc).__name__}: {exc}") from None
        if not (isinstance(obj, type) and issubclass(obj, Retriever)):
            raise RetrieverError(f"retriever {self.name!r} ({self.value}) is not a subclass of "
                                 "imaker.retrievers.Retriever")
        return obj


def available() -> dict[str, RetrieverInfo]:
    """Name -> info; built-ins first. A plugin cannot replace a built-in name."""
    out = {name: RetrieverInfo(name, value, "built-in") for name, value in BUILTIN.items()}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in out:
            continue
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "entry point"
        out[ep.name] = RetrieverInfo(ep.name, ep.value, origin)
    return out


def get(name: str) -> type[Retriever]:
    infos = available()
    if name not in infos:
        raise RetrieverError(f"no retriever named {name!r}; available: {', '.join(infos)}")
    return infos[name].load()


def describe_all() -> list[tuple[str, str, str]]:
    """(name, origin, description or the load error) for ``imaker retrieve --list``."""
    rows = []
    for info in available().values():
        try:
            desc = info.load().description or "(no description)"
        except RetrieverError as exc:
            desc = f"unavailable: {exc}"
        rows.append((info.name, info.origin, desc))
    return rows
