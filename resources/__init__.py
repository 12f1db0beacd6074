"""Dagster resources: thin, configurable wrappers over the domain objects in ``imaker``.

Defaults come from the environment (``imaker.settings``); every field can be overridden
per run in the launchpad.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from imaker.pipeline import Library
from imaker.queues import QueueStore
from imaker.separator.client import SeparatorClient
from imaker.settings import OutputOptions, Settings, load_settings


class QueueResource(ConfigurableResource):
    """The queue folders, the working folder and the done/failed archive."""

    queue_youtube_audio: str
    queue_youtube_video: str
    queue_other: str
    working_dir: str
    archive_dir: str
    max_claim_attempts: int = 3

    def store(self) -> QueueStore:
        return QueueStore({"youtube_audio": Path(self.queue_youtube_audio),
                           "youtube_video": Path(self.queue_youtube_video),
                           "other": Path(self.queue_other)},
                          Path(self.working_dir), Path(self.archive_dir), self.max_claim_attempts)


class LibraryResource(ConfigurableResource):
    """Where per-track data lives (library, stems store, outputs) and how outputs are made."""

    library_dir: str
    stems_dir: str
    outputs_dir: str
    generate_no_drums_variant: bool = True
    generate_drums_only_variant: bool = False
    preserve_stems: bool = False
    output_audio_format: str = "m4a"
    output_audio_bitrate: str = "256k"
    extra_variants: list[str] = []
    ytdl_duration_tol_sec: float = 2.0
    ytdl_duration_tol_pct: float = 0.01
    media_base_url: str = "http://127.0.0.1:8766"  # MEDIA_BASE_URL: links to the media server

    def library(self) -> Library:
        return Library(Path(self.library_dir), Path(self.stems_dir), Path(self.outputs_dir))

    def output_options(self) -> OutputOptions:
        return OutputOptions(self.generate_no_drums_variant, self.generate_drums_only_variant,
                             self.preserve_stems, self.output_audio_format,
                             self.output_audio_bitrate, tuple(self.extra_variants))

    @property
    def duration_tolerance(self) -> tuple[float, float]:
        return (self.ytdl_duration_tol_sec, self.ytdl_duration_tol_pct)


class SeparatorResource(ConfigurableResource):
    """The separation service the `stems` step sends its separations to, and the model and
    demucs options it asks for. ``url`` empty: the service on loopback port ``port``,
    started on first use (see ``imaker.separator.client``)."""

    url: str | None = None
    port: int = 8765
    model: str = "htdemucs"
    model_repo: str | None = None
    device: str = "auto"
    segment: float | None = None
    overlap: float = 0.25
    shifts: int = 1
    batch_size: int | None = None  # segments per forward pass; None: auto, 0: apply_model
    autocast: bool = True  # bf16 autocast on CUDA (batched path only)
    cpu_autocast: bool | None = None  # bf16 on the CPU: None = when native (inference_plan)
    concurrency: int | None = None  # separations at once in an auto-started service
    backend: str = "auto"  # DEMUCS_BACKEND: auto, torch, onnx, openvino, aoti

    def client(self) -> SeparatorClient:
        return SeparatorClient(
            url=self.url or None, port=self.port,
            model={"name": self.model, "repo": self.model_repo, "device": self.device},
            options={"segment": self.segment, "overlap": self.overlap, "shifts": self.shifts,
                     "batch_size": self.batch_size, "autocast": self.autocast,
                     "cpu_autocast": self.cpu_autocast, "backend": self.backend},
            concurrency=self.concurrency)


from .nas import NasResource, build_nas_resource  # noqa: E402  (defined in its own module)


def build_resources(settings: Settings | None = None, *, extra_variants: list[str] | None = None
                    ) -> dict[str, ConfigurableResource]:
    s = settings or load_settings()
    return {
        "queues": QueueResource(
            queue_youtube_audio=str(s.queue_youtube_audio),
            queue_youtube_video=str(s.queue_youtube_video), queue_other=str(s.queue_other),
            working_dir=str(s.working_dir), archive_dir=str(s.archive_dir),
            max_claim_attempts=s.max_claim_attempts),
        "library": LibraryResource(
            library_dir=str(s.library_dir), stems_dir=str(s.stems_dir),
            outputs_dir=str(s.outputs_dir),
            generate_no_drums_variant=s.generate_no_drums_variant,
            generate_drums_only_variant=s.generate_drums_only_variant,
            preserve_stems=s.preserve_stems, output_audio_format=s.output_audio_format,
            output_audio_bitrate=s.output_audio_bitrate,
            extra_variants=list(extra_variants or []),
            ytdl_duration_tol_sec=s.ytdl_duration_tol_sec,
            ytdl_duration_tol_pct=s.ytdl_duration_tol_pct,
            media_base_url=s.media_base_url),
        "nas": build_nas_resource(s),
        "separator": SeparatorResource(
            url=s.separator_url, port=s.separator_port, concurrency=s.separator_concurrency,
            model=s.demucs_model,
            model_repo=str(s.demucs_model_repo) if s.demucs_model_repo else None,
            device=s.demucs_device, segment=s.demucs_segment, overlap=s.demucs_overlap,
            shifts=s.demucs_shifts, batch_size=s.demucs_batch_size,
            autocast=s.demucs_autocast, cpu_autocast=s.demucs_cpu_autocast,
            backend=s.demucs_backend),
    }
