"""Listen from the UI: a small static media server and the generated library page. No Dagster.

The server (``imaker media serve``, a Starlette app run by uvicorn) serves two folders and
nothing else::

    /                    OUTPUTS_DIR/index.html, the library page (``write_library_page``)
    /outputs/<path>      OUTPUTS_DIR/<path>   (variants, videos, manifests)
    /library/<path>      LIBRARY_DIR/<path>   (source.flac, cover.*)

Files are served by Starlette's ``StaticFiles``: HTTP Range requests (206, so players can
seek), ETag / Last-Modified, ``..`` removed from paths, and a path whose real location
(symlinks resolved) is outside its folder is not found. Hidden entries (temporary ``.part``
files, ``.imaker/``) and directories are not served; audio/video get their own MIME types
even where the system has no mime.types table.

The page and the Dagster metadata link to the files through ``media_url`` under
``MEDIA_BASE_URL`` (the address a browser reaches the server at).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from .bundle import iter_manifests, manifest_section
from .fsutil import atomic_path

PAGE_FILE = "index.html"
OUTPUTS_PREFIX = "outputs"
LIBRARY_PREFIX = "library"
SOURCE_FILE = "source.flac"

#: set explicitly: Python 3.11 without /etc/mime.types knows neither .m4a nor .flac
MEDIA_TYPES = {
    ".m4a": "audio/mp4", ".mp4": "video/mp4", ".flac": "audio/flac", ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg", ".opus": "audio/ogg", ".wav": "audio/wav", ".webm": "video/webm",
    ".mkv": "video/x-matroska", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif",
    ".json": "application/json", ".csv": "text/csv; charset=utf-8",
    ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8",
}


# ----- links --------------------------------------------------------------------------
def media_url(base_url: str, prefix: str, relpath: str | Path) -> str:
    """``<base>/<prefix>/<relpath>`` with every path segment URL-quoted; an empty base gives
    a link relative to the page (``<prefix>/<relpath>``)."""
    rel = f"{prefix}/{quote(Path(relpath).as_posix().lstrip('/'), safe='/')}"
    return f"{base_url.rstrip('/')}/{rel}" if base_url else rel


def output_url(base_url: str, job_id: str, relpath: str) -> str:
    """Link to ``OUTPUTS_DIR/<job_id>/<relpath>`` (a manifest artifact's path)."""
    return media_url(base_url, OUTPUTS_PREFIX, f"{job_id}/{relpath}")


def source_url(base_url: str, job_id: str) -> str:
    """Link to the track's stored original (``LIBRARY_DIR/<job_id>/source.flac``)."""
    return media_url(base_url, LIBRARY_PREFIX, f"{job_id}/{SOURCE_FILE}")


def page_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/"


# ----- the library page ---------------------------------------------------------------
def _cover(library_dir: Path, job_id: str) -> str | None:
    folder = Path(library_dir) / job_id
    for path in sorted(folder.glob("cover.*")):
        if path.is_file() and path.suffix.lower() in MEDIA_TYPES \
                and MEDIA_TYPES[path.suffix.lower()].startswith("image/"):
            return path.name
    return None


def _duration(seconds) -> str:
    try:
        total = int(round(float(seconds)))
    except (TypeError, ValueError):
        return ""
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def library_entries(outputs_dir: Path, library_dir: Path,
                    job_ids: Iterable[str] | None = None) -> list[dict]:
    """One entry per ``outputs/<job_id>/manifest.json`` (restricted to ``job_ids``), newest
    first (the manifest's creation time), with relative links (to the page at ``/``)."""
    entries = []
    for job_id, folder, man in iter_manifests(outputs_dir, job_ids):
        prov = manifest_section(man, "provenance")
        src = manifest_section(prov, "source")
        players = []
        if (Path(library_dir) / job_id / SOURCE_FILE).is_file():
            players.append({"kind": "audio", "variant": "original", "label": "Original",
                            "url": source_url("", job_id)})
        for art in man.get("artifacts") or []:
            if not isinstance(art, dict) or art.get("kind") not in ("audio", "video"):
                continue
            rel = str(art.get("path") or "")
            if not rel or not (folder / rel).is_file():
                continue
            players.append({"kind": art["kind"], "variant": str(art.get("variant") or ""),
                            "label": str(art.get("label") or art.get("variant") or rel),
                            "url": output_url("", job_id, rel)})
        cover = _cover(library_dir, job_id)
        entries.append({
            "job_id": job_id, "artist": str(man.get("artist") or ""),
            "album": str(man.get("album") or ""), "title": str(man.get("title") or job_id),
            "duration_s": src.get("duration_s"), "duration": _duration(src.get("duration_s")),
            "created_at": str(prov.get("created_at") or ""),
            "cover": media_url("", LIBRARY_PREFIX, f"{job_id}/{cover}") if cover else None,
            "players": players})
    entries.sort(key=lambda e: (e["created_at"], e["job_id"]), reverse=True)
    return entries


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f5f5f7;color:#1d1d1f}
header{padding:1rem 2rem;background:#1d1d1f;color:#fff}header h1{margin:0;font-size:1.4rem}
main{padding:1rem 2rem;display:grid;gap:1rem}
.track{display:flex;gap:1rem;background:#fff;border-radius:8px;padding:1rem;
box-shadow:0 1px 3px rgba(0,0,0,.1)}
.cover{width:120px;height:120px;object-fit:cover;border-radius:4px;background:#ddd;flex:none}
.info h2{margin:0 0 .2rem;font-size:1.1rem}.meta{color:#6e6e73;margin:0 0 .6rem}
.player{display:flex;align-items:center;gap:.6rem;margin:.2rem 0}
.player span{width:12rem}.player audio{width:28rem;max-width:60vw}
.player video{max-width:28rem}.job{color:#aaa;font-size:.8rem}
"""


def render_library_page(entries: list[dict], title: str = "instrumental-maker library") -> str:
    """The page's HTML: every text escaped, every link URL-quoted (titles come from job.json)."""
    esc = html.escape
    cards = []
    for e in entries:
        cover = (f'<img class="cover" src="{esc(e["cover"])}" alt="">' if e["cover"]
                 else '<div class="cover"></div>')
        meta = " · ".join(esc(x) for x in (e["artist"], e["album"], e["duration"]) if x)
        rows = []
        for p in e["players"]:
            tag = "video" if p["kind"] == "video" else "audio"
            rows.append(
                f'<div class="player" data-variant="{esc(p["variant"])}">'
                f'<span><a href="{esc(p["url"])}">{esc(p["label"])}</a></span>'
                f'<{tag} controls preload="metadata" src="{esc(p["url"])}"></{tag}></div>')
        duration_attr = (f' data-duration="{esc(str(e["duration_s"]))}"'
                         if e["duration_s"] is not None else "")
        cards.append(
            f'<article class="track" id="{esc(e["job_id"])}"{duration_attr}>{cover}'
            f'<div class="info"><h2>{esc(e["title"])}</h2><p class="meta">{meta}</p>'
            f'{"".join(rows)}<p class="job">{esc(e["job_id"])}</p></div></article>')
    body = "\n".join(cards) or "<p>No tracks yet.</p>"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><style>{_STYLE}</style></head>\n'
            f'<body><header><h1>{esc(title)}</h1>'
            f'<p>{len(entries)} track{"" if len(entries) == 1 else "s"}, newest first</p>'
            f'</header>\n<main>\n{body}\n</main></body></html>\n')


def write_library_page(outputs_dir: Path, library_dir: Path,
                       job_ids: Iterable[str] | None = None) -> Path:
    """Write ``OUTPUTS_DIR/index.html`` atomically (mode from the umask, like every output)."""
    dest = Path(outputs_dir) / PAGE_FILE
    text = render_library_page(library_entries(outputs_dir, library_dir, job_ids))
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return dest


# ----- the server ---------------------------------------------------------------------
def create_app(outputs_dir: Path, library_dir: Path):
    """The Starlette app serving the page, OUTPUTS_DIR and LIBRARY_DIR (see the module doc)."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, HTMLResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    class MediaFiles(StaticFiles):
        """StaticFiles (Range, ETag, no escape through ``..`` or symlinks) without hidden
        entries and with explicit media types."""

        def lookup_path(self, path: str):
            if any(part.startswith(".") for part in Path(path).parts):
                return "", None
            return super().lookup_path(path)

        def file_response(self, full_path, stat_result, scope, status_code: int = 200):
            response = super().file_response(full_path, stat_result, scope, status_code)
            media_type = MEDIA_TYPES.get(Path(full_path).suffix.lower())
            if media_type and response.status_code != 304:
                response.headers["content-type"] = media_type
                response.media_type = media_type
            response.headers["x-content-type-options"] = "nosniff"
            return response

    outputs_dir, library_dir = Path(outputs_dir), Path(library_dir)
    for folder in (outputs_dir, library_dir):
        folder.mkdir(parents=True, exist_ok=True)

    async def page(request) -> Response:
        path = outputs_dir / PAGE_FILE
        if path.is_file():
            return FileResponse(path, media_type=MEDIA_TYPES[".html"],
                                headers={"cache-control": "no-cache"})
        return HTMLResponse(render_library_page([]), headers={"cache-control": "no-cache"})

    async def health(request) -> Response:
        return Response("ok\n", media_type="text/plain")

    return Starlette(routes=[
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/health", health, methods=["GET", "HEAD"]),
        Mount(f"/{OUTPUTS_PREFIX}", app=MediaFiles(directory=outputs_dir), name=OUTPUTS_PREFIX),
        Mount(f"/{LIBRARY_PREFIX}", app=MediaFiles(directory=library_dir), name=LIBRARY_PREFIX),
    ])


def serve(host: str, port: int, outputs_dir: Path, library_dir: Path, *,
          log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn's handlers)."""
    import uvicorn

    uvicorn.run(create_app(outputs_dir, library_dir), host=host, port=port,
                log_level=log_level, server_header=False, proxy_headers=False)
