"""Every setting of instrumental-maker, declared once: the pydantic models below.

Each field is one environment variable (its ``alias``), with its type, default, allowed
values and a one-line doc (its ``description``). Everything else derives from these models:
``imaker settings`` (and its ``--markdown`` table in the README and ``--env-example``
file), the Dagster resource whose launchpad config overrides a setting for one run
(``resources.SettingsResource``), the separation service's request schema (the
``separation`` group itself) and the tests that check the deployment files. Adding a
setting is adding a field here.

Names follow the original plan (``../shared/seeds``). Defaults work on a laptop: all data
lives under ``IMAKER_DATA`` (default ``./data``) unless a path variable says otherwise.

The settings file: a ``.env`` (python-dotenv syntax) is read by every entry point
(``imaker``, README command 1, ``dagster dev``'s code server, the runs) through
``load_env_file``; the environment overrides it. Which file: ``IMAKER_ENV_FILE`` if set
(empty: none), else ``./.env`` in the current folder, else the checkout's ``.env``.
``imaker settings`` shows where each value came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, get_args

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      SecretStr, ValidationError, field_validator, model_validator)


class SettingsError(ValueError):
    """A bad setting, as one line naming the variable and the value (``name``: the
    variable, for the caller to say where it was set)."""

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


#: the checkout (where pyproject.toml and the default .env live)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV_FILE_VAR = "IMAKER_ENV_FILE"

# --- value types ---------------------------------------------------------------------
#: what runs the network on the CPU (``imaker.backends``)
Backend = Literal["auto", "torch", "onnx", "openvino", "aoti"]
BACKENDS: tuple[str, ...] = get_args(Backend)
AudioFormat = Literal["m4a", "mp3", "flac"]
NotifyEvent = Literal["done", "failed"]
EVENTS: tuple[str, ...] = get_args(NotifyEvent)


def _lower(value):
    return value.lower() if isinstance(value, str) else value


def _auto_none(value):
    """``auto`` (any case) means None: the program decides."""
    return None if isinstance(value, str) and value.lower() == "auto" else value


def _octal(value):
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError("expected an octal mask such as 022") from None
    if value is not None and not 0 <= value <= 0o777:
        raise ValueError("expected an octal mask such as 022")
    return value


def _split(value):
    """A list in one variable: items separated by commas, spaces or newlines."""
    return tuple(u for u in re.split(r"[,\s]+", value) if u) if isinstance(value, str) else value


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("expected http(s)://host[:port][/path]")
    return value.rstrip("/") if value else value


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda|mps|cuda:\d+", value):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return value


AbsPath = Annotated[Path, AfterValidator(lambda p: p.expanduser().resolve())]
Port = Annotated[int, Field(gt=0, lt=65536)]
Lower = BeforeValidator(_lower)


def setting(default: Any, doc: str, env: str, *, shown: str | None = None, **kw) -> Any:
    """One setting: its default, one-line doc and environment variable. ``shown``: how the
    docs write a default that is derived at load time (e.g. under ``IMAKER_DATA``)."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    if shown:
        extra["shown"] = shown
    return Field(default, description=doc, alias=env, json_schema_extra=extra or None, **kw)


def under_data(env: str, sub: str, doc: str) -> Any:
    """A folder whose default is ``$IMAKER_DATA/<sub>``."""
    return setting(None, doc, env, shown=f"`$IMAKER_DATA/{sub}`",
                   json_schema_extra={"under_data": sub})


class Group(BaseModel):
    """A group of settings; field names are the Python names, aliases the variables."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid",
                              validate_default=True)


# --- the groups ------------------------------------------------------------------------
class Paths(Group):
    """Where the data lives, and with which permissions it is written."""

    data_dir: AbsPath = setting(Path("data"), "root of every default folder below", "IMAKER_DATA",
                                shown="`./data`")
    queue_youtube_audio: AbsPath | None = under_data(
        "QUEUE_YOUTUBE_AUDIO", "queues/youtube_audio", "queue folder of the YouTube audio retriever")
    queue_youtube_video: AbsPath | None = under_data(
        "QUEUE_YOUTUBE_VIDEO", "queues/youtube_video", "queue folder of the YouTube video retriever")
    queue_other: AbsPath | None = under_data(
        "QUEUE_OTHER", "queues/other", "queue folder of every other retriever and of bundles "
                                       "you drop by hand")
    working_dir: AbsPath | None = under_data("WORKING_DIR", "working", "claimed bundles")
    archive_dir: AbsPath | None = under_data("ARCHIVE_DIR", "archive", "`done/` and `failed/`")
    outputs_dir: AbsPath | None = under_data(
        "OUTPUTS_DIR", "outputs", "`<job_id>/manifest.json`, `<job_id>/files/…`")
    library_dir: AbsPath | None = under_data(
        "LIBRARY_DIR", "library", "per-track source FLAC, job.json, cover")
    stems_dir: AbsPath | None = under_data("STEMS_DIR", "stems", "stored stems (the stems store)")
    umask: Annotated[int | None, BeforeValidator(_octal)] = setting(
        None, "permissions of everything written (outputs, library, stems, NAS copies): `022` "
              "gives files `0644` and folders `0755`, readable by a media server running as "
              "another user; `027` keeps them from others", "UMASK",
        shown="inherited (usually `022`)")

    @model_validator(mode="after")
    def _under_data(self):
        for name, info in type(self).model_fields.items():
            sub = (info.json_schema_extra or {}).get("under_data")
            if sub and getattr(self, name) is None:
                object.__setattr__(self, name, self.data_dir / sub)
        return self

    @property
    def queues(self) -> dict[str, Path]:
        """Queue name -> folder, in the order they are scanned."""
        return {"youtube_audio": self.queue_youtube_audio,
                "youtube_video": self.queue_youtube_video, "other": self.queue_other}


def host_cores() -> int:
    """The cores this process may use (``nproc``: the affinity mask, a container's cpuset)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def default_max_runs(cores: int) -> int:
    """Runs Dagster's queue starts at once by default: ``max(4, cores // 2)``.

    A run spends most of its time waiting on the separation service (the GPU, or the CPU
    cores the service splits) and its own CPU work is mostly encoding: its ``variants`` step
    runs one single-threaded encoder per variant (ffmpeg's AAC and LAME have no threading;
    2 variants by default) beside the stem decoders, about 2 cores, and ``source_audio``
    decodes and stores the source on about one. So half the cores in runs keeps every core
    encoding while the service separates the next tracks (16 cores: 8 runs took 8 x 240 s
    in 83.5 s on an H200 where 4 took 111.2 s, benchmarks/RESULTS.md). Never below 4, the
    figure measured on 2 cores (two runs encode while two wait on the CPU separation)."""
    return max(4, cores // 2)


class Ingest(Group):
    """How bundles are taken from the queues."""

    max_claim_attempts: int = setting(
        3, "runs per drop: a run that dies is retried by Dagster (tag `dagster/max_retries` = "
           "this − 1), then the bundle goes to `failed/`", "MAX_CLAIM_ATTEMPTS", ge=1)
    sensor_max_jobs_per_tick: int = setting(
        20, "bundles claimed per sensor tick (bounded work per tick)", "SENSOR_MAX_JOBS_PER_TICK",
        ge=1)
    max_runs: Annotated[int | None, BeforeValidator(_auto_none)] = setting(
        None, "runs (tracks) Dagster's run queue starts at once; the others wait in the queue: "
              "auto = max(4, cores ÷ 2) of the host (`nproc`): a run mostly waits on the "
              "separation service and its own work is encoding, about 2 cores per run. Every "
              "launcher (README command 1, `imaker`, compose) exports the effective number, "
              "which dagster.yaml reads", "MAX_CONCURRENT_RUNS",
        shown="`auto`", ge=1)

    @model_validator(mode="after")
    def _cores(self):
        if self.max_runs is None:
            object.__setattr__(self, "max_runs", default_max_runs(host_cores()))
        return self


class Output(Group):
    """What the variants stage produces for every track."""

    no_drums: bool = setting(True, "make `Artist - Track (no drum)`", "GENERATE_NO_DRUMS_VARIANT")
    drums_only: bool = setting(False, "make `Artist - Track (drums only)`",
                               "GENERATE_DRUMS_ONLY_VARIANT")
    preserve_stems: bool = setting(
        False, "also publish the stems under `outputs/<job_id>/files/stems/`", "PRESERVE_STEMS")
    audio_format: Annotated[AudioFormat, Lower] = setting(
        "m4a", "`m4a` (AAC), `mp3` or `flac`", "OUTPUT_AUDIO_FORMAT")
    audio_bitrate: str = setting("256k", "for m4a/mp3", "OUTPUT_AUDIO_BITRATE")


class Separation(Group):
    """The model and how it runs: also the separation service's request schema (a run
    sends its ``separation`` group with every request)."""

    model: str = setting("htdemucs", "model (bag) name", "DEMUCS_MODEL", min_length=1)
    instrumental_model: Annotated[tuple[str, ...], BeforeValidator(_split)] = setting(
        (), "RoFormer model(s) in `DEMUCS_MODEL_REPO` (`<name>.ckpt` + `<name>.yaml`, see "
            "*Models*) that make the `instrumental` variant (their non-vocal output); `a,b` "
            "averages several (an ensemble). `no_drums` is then that instrumental minus the "
            "`DEMUCS_MODEL` drums and `drums_only` those drums: `DEMUCS_MODEL` runs only when "
            "a drum variant is made. Unset: `DEMUCS_MODEL` makes every variant",
        "INSTRUMENTAL_MODEL", shown="—")
    model_repo: AbsPath | None = setting(
        None, "the folder of weights (`<sig>-<hash>.th` + `<name>.yaml`, demucs' `--repo` "
              "layout; `imaker models fetch` fills it). A model missing there fails the track "
              "at once, naming the model, the folder and the command to fetch it",
        "DEMUCS_MODEL_REPO", shown="`$IMAKER_DATA/models`")
    device: Annotated[str, Lower, AfterValidator(_device)] = setting(
        "auto", "`auto`, `cpu`, `cuda`, `cuda:N` (`mps` on a Mac)", "DEMUCS_DEVICE")
    segment: float | None = setting(None, "window length in seconds (demucs `--segment`)",
                                    "DEMUCS_SEGMENT", shown="the model's", gt=0)
    overlap: float = setting(0.25, "overlap of the windows (demucs `--overlap`)",
                             "DEMUCS_OVERLAP", ge=0, lt=1)
    shifts: int = setting(1, "random shifts averaged (demucs `--shifts`)", "DEMUCS_SHIFTS", ge=0)
    batch_size: Annotated[int | None, BeforeValidator(_auto_none)] = setting(
        None, "segments per forward pass in our batched loop (`imaker/fast_apply.py`, same "
              "output as `apply_model`): auto = 8 on CUDA, 1 on CPU (same speed as "
              "`apply_model`, ~45 % less peak memory on long tracks); `0` = demucs' own "
              "`apply_model`", "DEMUCS_BATCH_SIZE", shown="`auto`", ge=0)
    autocast: bool = setting(True, "on CUDA, bf16 autocast with the STFT/iSTFT kept in fp32 "
                                   "(demucs and RoFormer models)", "DEMUCS_AUTOCAST")
    cpu_autocast: Annotated[bool | None, BeforeValidator(_auto_none)] = setting(
        None, "bf16 autocast on the CPU: `auto` = on when the CPU computes bf16 natively (AMX / "
              "AVX512-BF16; ≈ 1.4× faster separation there, 42–53 dB SNR against fp32 — the "
              "same ≥ 40 dB bar as the GPU path, tested), off elsewhere (emulated bf16 is "
              "slower); `false` = fp32, demucs' own numbers. RoFormer models: `auto` = on only "
              "with AMX-BF16 (≈ 2× faster there at ≥ 40 dB against fp32, the band split kept "
              "fp32; benchmarks/RESULTS.md)", "DEMUCS_CPU_AUTOCAST", shown="`auto`")
    backend: Annotated[Backend, Lower] = setting(
        "auto", "what runs the network on the CPU in our segment loop (`imaker/backends.py`): "
                "`auto` = OpenVINO (a dependency, in the image too) for HTDemucs models, in fp32 "
                "— or in bf16 where `DEMUCS_CPU_AUTOCAST` picks bf16 — else PyTorch; `torch`; "
                "`openvino`; `onnx` (ONNX Runtime, needs `onnxruntime`); `aoti` (AOTInductor, "
                "needs a C++ compiler, ~1–2 min to compile). The network is converted once per "
                "model and cached in `<DEMUCS_MODEL_REPO>/.imaker-cache/` (or "
                "`~/.cache/imaker/` when the repo is read-only); figures in "
                "benchmarks/RESULTS.md. RoFormer models run on PyTorch (another backend named "
                "here is warned about once)", "DEMUCS_BACKEND")


class Service(Group):
    """Where the separation service is."""

    url: Annotated[str | None, AfterValidator(_http_url)] = setting(
        None, "the separation service, e.g. `http://separator:8765` (compose); unset: the one "
              "on `127.0.0.1:SEPARATOR_PORT`, started on first use", "SEPARATOR_URL", shown="—")
    port: Port = setting(8765, "port of that loopback service", "SEPARATOR_PORT")
    concurrency: Annotated[int | None, BeforeValidator(_auto_none)] = setting(
        None, "separations the service runs at once (the rest wait): auto = the CPU cores (they "
              "split the cores) with PyTorch, 1 (all cores for one separation) where the "
              "OpenVINO backend runs; on CUDA as many as fit 0.8 of the free GPU memory by "
              "what one separation's windows were measured to take (2 until then), their "
              "windows sharing forward passes", "SEPARATOR_CONCURRENCY", shown="`auto`", ge=1)


class Notify(Group):
    """Messages when a track is done or failed (``imaker/notify.py``)."""

    urls: Annotated[tuple[str, ...], BeforeValidator(_split)] = setting(
        (), "Apprise URLs told when a track is done or failed (see *Notifications*), separated "
            "by commas or spaces; invalid ones stop imaker at start-up", "NOTIFY_URLS",
        shown="—", json_schema_extra={"secret": True})
    on: Annotated[tuple[Annotated[NotifyEvent, Lower], ...], BeforeValidator(_split)] = setting(
        ("done", "failed"), "which outcomes are sent: `done`, `failed` or both", "NOTIFY_ON",
        shown="`done,failed`", min_length=1)

    @field_validator("urls")
    @classmethod
    def _apprise_knows_them(cls, urls):
        """Each URL is checked by Apprise here, so a typo fails at start-up rather than
        silently when the first track is done."""
        if urls:
            import apprise

            bad = [u for u in urls if not apprise.Apprise().add(u)]
            if bad:
                shown = ", ".join(u.split("://", 1)[0] + "://…" if "://" in u else repr(u[:20])
                                  for u in bad)
                raise ValueError(
                    f"{len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not a valid "
                    f"Apprise URL ({shown}); see https://github.com/caronc/apprise/wiki for "
                    "the URL of each service")
        return urls

    @field_validator("on")
    @classmethod
    def _once_each(cls, on):
        return tuple(dict.fromkeys(on))


class Media(Group):
    """The media server (listen from the UI; ``imaker/media.py``)."""

    host: str = setting("127.0.0.1", "where `imaker media serve` listens (see *Listening*)",
                        "MEDIA_HOST")
    port: Port = setting(8766, "its port", "MEDIA_PORT")
    base_url: Annotated[str | None, AfterValidator(_http_url)] = setting(
        None, "the media server's address as a browser reaches it: links in the Dagster "
              "metadata and the catalog's `library_page`", "MEDIA_BASE_URL",
        shown="`http://MEDIA_HOST:MEDIA_PORT` (`127.0.0.1` when the host is `0.0.0.0`)")

    @model_validator(mode="after")
    def _link(self):
        if self.base_url is None:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "*") else self.host
            host = f"[{host}]" if ":" in host else host
            object.__setattr__(self, "base_url", f"http://{host}:{self.port}")
        return self


class Nas(Group):
    """Copies of finished jobs on a NAS (``docs/nas_sync.md``)."""

    enabled: bool = setting(False, "NAS sync, see *NAS sync*", "NAS_SYNC_ENABLED")
    config_path: AbsPath | None = setting(
        None, "its YAML config", "NAS_SYNC_CONFIG_PATH",
        shown="`$IMAKER_DATA/nas_sync_config.yaml`")


class Retrievers(Group):
    """What the retrievers download (``docs/retrievers.md``)."""

    ytdl_mode: Annotated[Literal["audio", "video", "both"], Lower] = setting(
        "audio", "YouTube retriever: audio, video or both", "YTDL_MODE")
    ytdl_audio_format: str = setting("m4a", "YouTube retriever's audio format", "YTDL_AUDIO_FORMAT")
    ytdl_duration_tol_sec: float = setting(
        2.0, "the decoded audio must match a bundle's `youtube.duration_online_s` within this "
             "many seconds …", "YTDL_DURATION_TOL_SEC", ge=0)
    ytdl_duration_tol_pct: float = setting(
        0.01, "… or this fraction of it, whichever is larger", "YTDL_DURATION_TOL_PCT", ge=0)
    deezer_arl: SecretStr | None = setting(
        None, "Deezer login cookie for the deezer retriever (never printed)", "DEEZER_ARL",
        shown="—")


class Settings(Group):
    """All settings, by group (attribute = group)."""

    paths: Paths = Field(default_factory=Paths)
    ingest: Ingest = Field(default_factory=Ingest)
    output: Output = Field(default_factory=Output)
    separation: Separation = Field(default_factory=Separation)
    service: Service = Field(default_factory=Service)
    notify: Notify = Field(default_factory=Notify)
    media: Media = Field(default_factory=Media)
    nas: Nas = Field(default_factory=Nas)
    retrievers: Retrievers = Field(default_factory=Retrievers)

    @model_validator(mode="after")
    def _under_data(self):
        """Defaults of other groups that live under ``IMAKER_DATA``."""
        data = self.paths.data_dir
        if self.separation.model_repo is None:
            object.__setattr__(self, "separation",
                               self.separation.model_copy(update={"model_repo": data / "models"}))
        if self.nas.config_path is None:
            object.__setattr__(self, "nas", self.nas.model_copy(
                update={"config_path": data / "nas_sync_config.yaml"}))
        return self

    # --- reading ------------------------------------------------------------------------
    @classmethod
    def groups(cls) -> dict[str, type[Group]]:
        return {name: info.annotation for name, info in cls.model_fields.items()}

    @classmethod
    def variables(cls) -> Iterator[tuple[str, str, str, Any]]:
        """(group, field, environment variable, FieldInfo) of every setting, in order."""
        for gname, group in cls.groups().items():
            for fname, info in group.model_fields.items():
                yield gname, fname, info.alias, info

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Settings from environment variables; a value that is empty (or only quotes)
        means the default. Raises ``SettingsError`` naming the first bad variable."""
        raw: dict[str, dict[str, str]] = {g: {} for g in cls.groups()}
        for gname, _, name, _ in cls.variables():
            value = clean(env.get(name))
            if value is not None:
                raw[gname][name] = value
        return cls.validated(raw)

    @classmethod
    def validated(cls, raw: Mapping[str, Mapping[str, Any]]) -> "Settings":
        """Validate group dicts (keys: field names or variables) into Settings, any bad
        value raised as a one-line ``SettingsError``."""
        try:
            return cls.model_validate({g: dict(v) for g, v in raw.items()})
        except ValidationError as exc:
            raise _one_line(exc, raw) from None

    def replace(self, **groups: Mapping[str, Any]) -> "Settings":
        """A copy with some fields changed, validated: ``s.replace(output={"no_drums": False})``."""
        data = {g: getattr(self, g).model_dump() for g in self.groups()}
        for g, changes in groups.items():
            data[g].update(changes)
        return self.validated(data)

    def env_values(self) -> dict[str, str | None]:
        """Each variable's effective value as text (secrets hidden), in order."""
        out = {}
        for gname, fname, name, info in self.variables():
            value = getattr(getattr(self, gname), fname)
            out[name] = as_text(value, secret=(info.json_schema_extra or {}).get("secret", False))
        return out


def clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().strip('"').strip("'").strip()
    return value or None


def as_text(value, secret: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return "…" if value.get_secret_value() else None
    if isinstance(value, tuple):
        if secret:  # Apprise URLs carry tokens and passwords: shown as their schemes only
            return ", ".join(u.split("://", 1)[0] + "://…" for u in value)
        return ",".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


_KINDS = {"int_parsing": "is not an integer", "int_from_float": "is not an integer",
          "float_parsing": "is not a number", "bool_parsing": "is not a boolean (use true/false)"}


def _one_line(exc: ValidationError, raw: Mapping[str, Mapping[str, Any]]) -> SettingsError:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    group = Settings.groups().get(loc[0]) if loc else None
    name = loc[1] if len(loc) > 1 else (loc[0] if loc else "?")
    if group is not None and name in group.model_fields:  # given by field name
        name = group.model_fields[name].alias
    value = (raw.get(loc[0]) or {}).get(name, err.get("input")) if loc else err.get("input")
    shown = "…" if name in ("DEEZER_ARL",) else repr(value)
    if err["type"] in _KINDS:
        return SettingsError(f"{name}={shown} {_KINDS[err['type']]}", name)
    if err["type"] == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "").replace("'", "")
        return SettingsError(f"{name}={shown}: expected one of {allowed}", name)
    message = err["msg"].removeprefix("Value error, ")
    return SettingsError(f"{name}={shown}: {message}", name)


# --- the settings file ---------------------------------------------------------------------
#: variables holding paths: a relative one in the settings file is relative to the file's
#: folder (as docker compose does), so every command finds the same data from any folder
PATH_VARS = tuple(name for _, _, name, info in Settings.variables()
                  if "Path" in str(info.annotation)) + ("DAGSTER_HOME",)
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
            raise SettingsError(f"{ENV_FILE_VAR}={path}: no such file", ENV_FILE_VAR)
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


#: variables Dagster's instance reads from the environment (dagster.yaml ``{env: NAME}``),
#: which this process set to their effective value (``export_dagster_env``)
_EXPORTED: set[str] = set()


def dagster_env(settings: "Settings") -> dict[str, str]:
    """The settings dagster.yaml (both) reads from the environment, as the effective values
    Dagster takes (a number where the setting says ``auto``): the run coordinator's
    ``max_concurrent_runs`` is ``{env: MAX_CONCURRENT_RUNS}`` because the instance's
    ``concurrency.runs.max_concurrent_runs`` takes a plain number only, and the default
    derives from the host's cores. An unset (or empty, or ``auto``) variable there is an
    error in every process that opens the instance, so every launcher sets it: the
    ``imaker`` command (and the daemon it may start), README command 1 (scripts/serve.sh,
    through ``imaker settings --export``), compose (docker/docker-compose.yml's
    ``x-dagster-env`` entrypoint) and the tests (conftest)."""
    return {"MAX_CONCURRENT_RUNS": str(settings.ingest.max_runs)}


def export_dagster_env(settings: "Settings", environ: Any = None) -> dict[str, str]:
    """Put ``dagster_env(settings)`` into ``environ`` (default ``os.environ``: the children
    inherit it); ``origin`` still says "default" for a value derived here."""
    environ = os.environ if environ is None else environ
    values = dagster_env(settings)
    for name, value in values.items():
        if environ is os.environ and clean(environ.get(name)) in (None, "auto"):
            _EXPORTED.add(name)  # this process's ``origin``
        environ[name] = value
    return values


def origin(name: str) -> str:
    """Where a variable's value comes from: "environment", the settings file, or "default"."""
    if name in _EXPORTED:
        return "default"
    if name in _FROM_FILE:
        return _FROM_FILE[name]
    return "environment" if clean(os.environ.get(name)) is not None else "default"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: ``os.environ`` after ``load_env_file``)."""
    if env is None:
        load_env_file()
        env = os.environ
    return Settings.from_env(env)


def explain() -> tuple[Path | None, list[tuple[str, str | None, str]]]:
    """The settings file and, for every setting, (variable, effective value as text,
    where it came from). Raises ``SettingsError`` like ``load_settings``."""
    path = load_env_file()
    values = load_settings().env_values()
    return path, [(name, value, origin(name)) for name, value in values.items()]


# --- documents made from the models --------------------------------------------------------
def _default_text(info) -> str:
    """The default as the docs write it (markdown)."""
    shown = (info.json_schema_extra or {}).get("shown")
    if shown:
        return shown
    value = as_text(info.default)
    return "—" if value in (None, "") else f"`{value}`"


def markdown_table() -> str:
    """The README's settings table (``imaker settings --markdown``)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for _, _, name, info in Settings.variables():
        lines.append(f"| `{name}` | {_default_text(info)} | {info.description} |")
    return "\n".join(lines) + "\n"


def env_example() -> str:
    """The settings file template ``.env.example`` (``imaker settings --env-example``)."""
    out = ["# instrumental-maker settings: copy to .env (this folder) and edit. Every `imaker`",
           "# command, README command 1 (`dagster dev`) and the runs read it; an exported",
           "# variable overrides it. Relative paths are relative to this file. `imaker settings`",
           "# shows the effective values. Made by `imaker settings --env-example` from",
           "# imaker/settings.py (README.md, \"Settings\", has the same table).", ""]
    for gname, group in Settings.groups().items():
        out.append(f"# --- {gname}: {(group.__doc__ or '').strip().splitlines()[0]}")
        for name, info in ((i.alias, i) for i in group.model_fields.values()):
            doc = info.description.replace("`", "")
            doc = doc if len(doc) <= 100 else doc[:97].rsplit(" ", 1)[0] + " …"
            out.append(f"# {doc} (default: {_default_text(info).replace('`', '')})")
            default = as_text(info.default) if not (info.json_schema_extra or {}).get("shown") \
                else ""
            out.append(f"#{name}={default or ''}")
        out.append("")
    out += ["# Dagster (README command 1)", "#DAGSTER_HOME=dagster_home", "#DAGSTER_PORT=3000", ""]
    return "\n".join(out)
