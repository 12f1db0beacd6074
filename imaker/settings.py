"""Every setting of instrumental-maker, read from the environment in this one place.

Names follow the original plan (``../shared/seeds``). Defaults work on a laptop: all
data lives under ``IMAKER_DATA`` (default ``./data``) unless a path variable says otherwise.

The settings file: a ``.env`` (python-dotenv syntax) is read by every entry point
(``imaker``, README command 1, ``dagster dev``'s code server, the runs) through
``load_env_file``; the environment overrides it. Which file: ``IMAKER_ENV_FILE`` if set
(empty: none), else ``./.env`` in the current folder, else the checkout's ``.env``.
``imaker settings`` shows where each value came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    pass


#: the checkout (where pyproject.toml and the default .env live)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV_FILE_VAR = "IMAKER_ENV_FILE"
#: variables holding paths: a relative one in the settings file is relative to the file's
#: folder (as docker compose does), so every command finds the same data from any folder
PATH_VARS = ("IMAKER_DATA", "QUEUE_YOUTUBE_AUDIO", "QUEUE_YOUTUBE_VIDEO", "QUEUE_OTHER",
             "WORKING_DIR", "ARCHIVE_DIR", "OUTPUTS_DIR", "LIBRARY_DIR", "STEMS_DIR",
             "DEMUCS_MODEL_REPO", "NAS_SYNC_CONFIG_PATH", "DAGSTER_HOME")
#: names read from the settings file, and the file, once ``load_env_file`` ran
_FROM_FILE: dict[str, str] = {}
_LOADED: list[Path | None] = []


def env_file_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The settings file this process reads (see the module docstring), or None."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_FILE_VAR)
    if raw is not None:
        return Path(raw).expanduser().resolve() if raw.strip() else None
    for candidate in (Path.cwd() / ".env", PROJECT_ROOT / ".env"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def load_env_file() -> Path | None:
    """Put the settings file's values into ``os.environ`` where the environment does not
    set them already (python-dotenv, ``override=False``), once per process, so that child
    processes (the daemon, code servers, runs) see the same settings. Returns the file."""
    if _LOADED:
        return _LOADED[0]
    path = env_file_path()
    if path is not None:
        if not path.is_file():
            raise SettingsError(f"{ENV_FILE_VAR}={path}: no such file")
        from dotenv import dotenv_values

        try:
            values = dotenv_values(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read the settings file {path}: {exc}") from None
        for name, value in values.items():
            if value is not None and name not in os.environ:
                if name in PATH_VARS and value.strip() and not value.strip().startswith(
                        ("/", "~", "$")):
                    value = str(path.parent / value.strip())
                os.environ[name] = value
                _FROM_FILE[name] = str(path)
        # children find the same file even from another folder
        os.environ.setdefault(ENV_FILE_VAR, str(path))
    _LOADED.append(path)
    return path


class _Recording(Mapping):
    """``os.environ`` that remembers which names were read (for ``explain``)."""

    def __init__(self, env: Mapping[str, str]):
        self.env, self.read = env, []

    def __getitem__(self, key):
        if key not in self.read:
            self.read.append(key)
        return self.env[key]

    def get(self, key, default=None):
        if key not in self.read:
            self.read.append(key)
        return self.env.get(key, default)

    def __iter__(self):
        return iter(self.env)

    def __len__(self):
        return len(self.env)


def explain() -> tuple[Path | None, list[tuple[str, str | None, str]]]:
    """The settings file and, for every variable the settings read, (name, the value set
    or None for the default, where it came from). Raises ``SettingsError`` like
    ``load_settings``."""
    path = load_env_file()
    recording = _Recording(os.environ)
    load_settings(recording)
    return path, [(name, os.environ.get(name), origin(name)) for name in recording.read]


def origin(name: str) -> str:
    """Where a variable's value comes from: "environment", the settings file, or "default"."""
    if name in _FROM_FILE:
        return _FROM_FILE[name]
    return "environment" if name in os.environ else "default"


def _clean(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip().strip('"').strip("'").strip()
    return value or None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _clean(env, name)
    if raw is None:
        return default
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false)")


def _num(env: Mapping[str, str], name: str, default, kind=float):
    raw = _clean(env, name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise SettingsError(f"{name}={raw!r} is not {what}") from None


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = (_clean(env, name) or default).lower()
    if raw not in allowed:
        raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return raw


@dataclass(frozen=True)
class OutputOptions:
    """What the variants stage produces."""

    no_drums: bool = True
    drums_only: bool = False
    preserve_stems: bool = False
    audio_format: str = "m4a"
    audio_bitrate: str = "256k"
    extra_variants: tuple[str, ...] = ()  # variant table entries to add for every track


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    queue_youtube_audio: Path
    queue_youtube_video: Path
    queue_other: Path
    working_dir: Path
    archive_dir: Path
    outputs_dir: Path
    library_dir: Path
    stems_dir: Path
    generate_no_drums_variant: bool
    generate_drums_only_variant: bool
    preserve_stems: bool
    output_audio_format: str
    output_audio_bitrate: str
    max_claim_attempts: int
    sensor_max_jobs_per_tick: int
    demucs_model: str
    demucs_model_repo: Path  # DEMUCS_MODEL_REPO, default $IMAKER_DATA/models
    demucs_device: str
    demucs_segment: float | None
    demucs_overlap: float
    demucs_shifts: int
    demucs_batch_size: int | None  # None: auto (8 on CUDA, 1 elsewhere); 0: demucs apply_model
    demucs_autocast: bool
    demucs_cpu_autocast: bool | None  # bf16 on the CPU; None: auto (when the CPU has it natively)
    separator_url: str | None  # None: a service on loopback, started on first use
    separator_port: int  # port of that auto-started service
    separator_concurrency: int | None  # separations the service runs at once; None: auto
    umask: int | None  # UMASK (octal, e.g. 022); None: the inherited one
    nas_sync_enabled: bool
    nas_sync_config_path: Path
    ytdl_mode: str
    ytdl_audio_format: str
    ytdl_duration_tol_sec: float
    ytdl_duration_tol_pct: float
    # notifications (imaker/notify.py); defaults so that code building Settings by hand
    # needs no change
    notify_urls: tuple[str, ...] = ()   # NOTIFY_URLS: Apprise URLs; () = no notifications
    notify_on: tuple[str, ...] = ("done", "failed")  # NOTIFY_ON: which outcomes are sent
    # --- media server (listen from the UI; imaker/media.py) ---
    media_host: str = "127.0.0.1"  # MEDIA_HOST: address `imaker media serve` listens on
    media_port: int = 8766  # MEDIA_PORT
    media_base_url: str = "http://127.0.0.1:8766"  # MEDIA_BASE_URL: links in the UI and page
    # DEMUCS_BACKEND: what runs the network on the CPU (fp32): auto, torch, onnx, openvino,
    # aoti (imaker.backends; auto picks the fastest installed converted backend)
    demucs_backend: str = "auto"

    @property
    def queues(self) -> dict[str, Path]:
        """Queue name -> folder, in the order they are scanned."""
        return {
            "youtube_audio": self.queue_youtube_audio,
            "youtube_video": self.queue_youtube_video,
            "other": self.queue_other,
        }

    def as_dict(self) -> dict[str, object]:
        return {f.name: (str(v) if isinstance(v, Path) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: ``os.environ`` after ``load_env_file``)."""
    if env is None:
        load_env_file()
        env = os.environ
    data = Path(_clean(env, "IMAKER_DATA") or "data").expanduser().resolve()

    def path(name: str, default: Path) -> Path:
        raw = _clean(env, name)
        return Path(raw).expanduser().resolve() if raw else default

    segment = _num(env, "DEMUCS_SEGMENT", None)
    batch_raw = _clean(env, "DEMUCS_BATCH_SIZE")
    batch_size = (None if batch_raw is None or batch_raw.lower() == "auto"
                  else _num(env, "DEMUCS_BATCH_SIZE", None, int))
    conc_raw = _clean(env, "SEPARATOR_CONCURRENCY")
    concurrency = (None if conc_raw is None or conc_raw.lower() == "auto"
                   else _num(env, "SEPARATOR_CONCURRENCY", None, int))
    umask_raw = _clean(env, "UMASK")
    try:
        umask = int(umask_raw, 8) if umask_raw is not None else None
    except ValueError:
        raise SettingsError(f"UMASK={umask_raw!r}: expected an octal mask such as 022") from None
    if umask is not None and not 0 <= umask <= 0o777:
        raise SettingsError(f"UMASK={umask_raw!r}: expected an octal mask such as 022")
    separator_url = _clean(env, "SEPARATOR_URL")
    if separator_url and not separator_url.startswith(("http://", "https://")):
        raise SettingsError(f"SEPARATOR_URL={separator_url!r}: expected http://host:port")
    repo = _clean(env, "DEMUCS_MODEL_REPO")
    device = (_clean(env, "DEMUCS_DEVICE") or "auto").lower()
    if not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        raise SettingsError(f"DEMUCS_DEVICE={device!r}: expected auto, cpu, cuda or cuda:N")
    settings = Settings(
        data_dir=data,
        queue_youtube_audio=path("QUEUE_YOUTUBE_AUDIO", data / "queues" / "youtube_audio"),
        queue_youtube_video=path("QUEUE_YOUTUBE_VIDEO", data / "queues" / "youtube_video"),
        queue_other=path("QUEUE_OTHER", data / "queues" / "other"),
        working_dir=path("WORKING_DIR", data / "working"),
        archive_dir=path("ARCHIVE_DIR", data / "archive"),
        outputs_dir=path("OUTPUTS_DIR", data / "outputs"),
        library_dir=path("LIBRARY_DIR", data / "library"),
        stems_dir=path("STEMS_DIR", data / "stems"),
        generate_no_drums_variant=_bool(env, "GENERATE_NO_DRUMS_VARIANT", True),
        generate_drums_only_variant=_bool(env, "GENERATE_DRUMS_ONLY_VARIANT", False),
        preserve_stems=_bool(env, "PRESERVE_STEMS", False),
        output_audio_format=_choice(env, "OUTPUT_AUDIO_FORMAT", "m4a", ("m4a", "mp3", "flac")),
        output_audio_bitrate=_clean(env, "OUTPUT_AUDIO_BITRATE") or "256k",
        max_claim_attempts=_num(env, "MAX_CLAIM_ATTEMPTS", 3, int),
        sensor_max_jobs_per_tick=_num(env, "SENSOR_MAX_JOBS_PER_TICK", 20, int),
        demucs_model=_clean(env, "DEMUCS_MODEL") or "htdemucs",
        demucs_model_repo=Path(repo).expanduser().resolve() if repo else data / "models",
        demucs_device=device,
        demucs_segment=segment,
        demucs_overlap=_num(env, "DEMUCS_OVERLAP", 0.25),
        demucs_shifts=_num(env, "DEMUCS_SHIFTS", 1, int),
        demucs_batch_size=batch_size,
        demucs_autocast=_bool(env, "DEMUCS_AUTOCAST", True),
        demucs_cpu_autocast=(None if (_clean(env, "DEMUCS_CPU_AUTOCAST") or "auto").lower() == "auto"
                             else _bool(env, "DEMUCS_CPU_AUTOCAST", False)),
        separator_url=separator_url.rstrip("/") if separator_url else None,
        separator_port=_num(env, "SEPARATOR_PORT", 8765, int),
        separator_concurrency=concurrency,
        umask=umask,
        nas_sync_enabled=_bool(env, "NAS_SYNC_ENABLED", False),
        nas_sync_config_path=path("NAS_SYNC_CONFIG_PATH", data / "nas_sync_config.yaml"),
        ytdl_mode=_choice(env, "YTDL_MODE", "audio", ("audio", "video", "both")),
        ytdl_audio_format=_clean(env, "YTDL_AUDIO_FORMAT") or "m4a",
        ytdl_duration_tol_sec=_num(env, "YTDL_DURATION_TOL_SEC", 2.0),
        ytdl_duration_tol_pct=_num(env, "YTDL_DURATION_TOL_PCT", 0.01),
    )
    if settings.max_claim_attempts < 1:
        raise SettingsError("MAX_CLAIM_ATTEMPTS must be at least 1")
    if settings.sensor_max_jobs_per_tick < 1:
        raise SettingsError("SENSOR_MAX_JOBS_PER_TICK must be at least 1")
    if not 0 <= settings.demucs_overlap < 1:
        raise SettingsError("DEMUCS_OVERLAP must be in [0, 1)")
    if settings.demucs_shifts < 0:
        raise SettingsError("DEMUCS_SHIFTS must be >= 0")
    if settings.demucs_batch_size is not None and settings.demucs_batch_size < 0:
        raise SettingsError("DEMUCS_BATCH_SIZE must be auto, 0 (demucs apply_model) or >= 1")
    if settings.separator_concurrency is not None and settings.separator_concurrency < 1:
        raise SettingsError("SEPARATOR_CONCURRENCY must be auto or >= 1")
    if not 0 < settings.separator_port < 65536:
        raise SettingsError("SEPARATOR_PORT must be a TCP port (1-65535)")
    settings = _with_notifications(env, settings)
    settings = _with_media(env, settings)
    # DEMUCS_BACKEND (imaker.backends.BACKENDS; kept in sync there)
    backend = (_clean(env, "DEMUCS_BACKEND") or "auto").lower()
    if backend not in ("auto", "torch", "onnx", "openvino", "aoti"):
        raise SettingsError(f"DEMUCS_BACKEND={backend!r}: expected auto, torch, onnx, "
                            "openvino or aoti")
    settings = replace(settings, demucs_backend=backend)
    return settings


def _with_notifications(env: Mapping[str, str], settings: Settings) -> Settings:
    """NOTIFY_URLS (Apprise URLs, separated by commas, spaces or newlines) and NOTIFY_ON
    (done, failed or both: the default). Each URL is checked by Apprise here, so a typo
    fails at start-up rather than silently when the first track is done."""
    from .notify import EVENTS, invalid_urls, split_urls

    urls = split_urls(_clean(env, "NOTIFY_URLS"))
    bad = invalid_urls(urls) if urls else []
    if bad:
        shown = ", ".join(u.split("://", 1)[0] + "://…" if "://" in u else repr(u[:20])
                          for u in bad)
        raise SettingsError(f"NOTIFY_URLS: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'}"
                            f" not a valid Apprise URL ({shown}); see "
                            "https://github.com/caronc/apprise/wiki for the URL of each service")
    on = tuple(e for e in re.split(r"[,\s]+", (_clean(env, "NOTIFY_ON") or "done,failed").lower())
               if e)
    unknown = [e for e in on if e not in EVENTS]
    if unknown or not on:
        raise SettingsError(f"NOTIFY_ON={_clean(env, 'NOTIFY_ON')!r}: expected done, failed or "
                            "done,failed")
    return replace(settings, notify_urls=urls, notify_on=tuple(dict.fromkeys(on)))


def _with_media(env: Mapping[str, str], settings: Settings) -> Settings:
    # --- media server: MEDIA_HOST, MEDIA_PORT, MEDIA_BASE_URL (default: this host's port,
    # loopback when listening on every address) ---
    media_host = _clean(env, "MEDIA_HOST") or "127.0.0.1"
    media_port = _num(env, "MEDIA_PORT", 8766, int)
    if not 0 < media_port < 65536:
        raise SettingsError("MEDIA_PORT must be a TCP port (1-65535)")
    link_host = "127.0.0.1" if media_host in ("0.0.0.0", "::", "*") else media_host
    link_host = f"[{link_host}]" if ":" in link_host else link_host
    media_base_url = (_clean(env, "MEDIA_BASE_URL") or f"http://{link_host}:{media_port}").rstrip("/")
    if not media_base_url.startswith(("http://", "https://")):
        raise SettingsError(f"MEDIA_BASE_URL={media_base_url!r}: expected http(s)://host[:port][/path]")
    return replace(settings, media_host=media_host, media_port=media_port,
                   media_base_url=media_base_url)
