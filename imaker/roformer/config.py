"""RoFormer model configs in the ZFTurbo / UVR yaml format (no Dagster, no torch).

A model is two files in one folder: ``<name>.ckpt`` (the state dict) and ``<name>.yaml``
with the sections ``audio`` (``chunk_size``, ``sample_rate``, ...), ``model`` (the
constructor arguments of the network), ``training`` (``instruments``,
``target_instrument``) and ``inference`` (``dim_t``, ``num_overlap``, ``batch_size``).

The released yaml files write tuple-valued keys (``freqs_per_bands``,
``multi_stft_resolutions_window_sizes``) with the tag ``!!python/tuple``. They are read
with a ``yaml.SafeLoader`` that constructs that one tag as a tuple and nothing else: any
other ``!!python/...`` tag (objects, names, modules) is refused like any unknown tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BS_ROFORMER = "bs_roformer"
MEL_BAND_ROFORMER = "mel_band_roformer"
ARCHITECTURES = (BS_ROFORMER, MEL_BAND_ROFORMER)


class RoformerConfigError(ValueError):
    """A config that cannot be used; ``str()`` is one line naming the file and the reason."""


class TupleSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus ``!!python/tuple`` (a sequence made a tuple)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    if not isinstance(node, yaml.SequenceNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"!!python/tuple expects a sequence, got {node.id}", node.start_mark)
    return tuple(loader.construct_sequence(node, deep=True))


TupleSafeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def load_yaml(text: str) -> Any:
    """Parse yaml text with ``TupleSafeLoader``."""
    return yaml.load(text, Loader=TupleSafeLoader)  # noqa: S506 - a SafeLoader subclass


# Constructor arguments (the ``model`` section) that change neither the network nor its
# output at inference: losses, dropout, memory/speed switches of training.
_IGNORED_KEYS = {
    "attn_dropout", "ff_dropout", "dim_freqs_in", "multi_stft_resolution_loss_weight",
    "multi_stft_resolutions_window_sizes", "multi_stft_hop_size", "multi_stft_normalized",
    "multi_stft_window_fn", "use_torch_checkpoint", "sage_attention", "zero_dc",
}
_COMMON_KEYS = {
    "dim", "depth", "stereo", "num_stems", "time_transformer_depth", "freq_transformer_depth",
    "linear_transformer_depth", "dim_head", "heads", "flash_attn", "stft_n_fft",
    "stft_hop_length", "stft_win_length", "stft_normalized", "mask_estimator_depth",
    "mlp_expansion_factor", "skip_connection",
}
_ARCH_KEYS = {
    BS_ROFORMER: {"freqs_per_bands"},
    MEL_BAND_ROFORMER: {"num_bands", "sample_rate", "match_input_audio_length"},
}
# The constructors' defaults (ZFTurbo's classes, where the checkpoints were trained).
_DEFAULTS: dict[str, dict[str, Any]] = {
    BS_ROFORMER: dict(stereo=False, num_stems=1, time_transformer_depth=2,
                      freq_transformer_depth=2, linear_transformer_depth=0, dim_head=64,
                      heads=8, flash_attn=True, stft_n_fft=2048, stft_hop_length=512,
                      stft_win_length=2048, stft_normalized=False, mask_estimator_depth=2,
                      mlp_expansion_factor=4, skip_connection=False),
    MEL_BAND_ROFORMER: dict(stereo=False, num_stems=1, time_transformer_depth=2,
                            freq_transformer_depth=2, linear_transformer_depth=0,
                            dim_head=64, heads=8, flash_attn=True, sample_rate=44100,
                            stft_n_fft=2048, stft_hop_length=512, stft_win_length=2048,
                            stft_normalized=False, mask_estimator_depth=1,
                            mlp_expansion_factor=4, skip_connection=False,
                            match_input_audio_length=False),
}
_INT_KEYS = {"dim", "depth", "num_stems", "time_transformer_depth", "freq_transformer_depth",
             "linear_transformer_depth", "dim_head", "heads", "stft_n_fft", "stft_hop_length",
             "stft_win_length", "mask_estimator_depth", "mlp_expansion_factor", "num_bands",
             "sample_rate"}
_BOOL_KEYS = {"stereo", "flash_attn", "stft_normalized", "skip_connection",
              "match_input_audio_length"}


@dataclass(frozen=True)
class RoformerConfig:
    """What a RoFormer yaml says, checked: the architecture, the network's arguments
    (defaults filled in), the stems and the windowing."""

    path: Path
    architecture: str                 # BS_ROFORMER or MEL_BAND_ROFORMER
    model: dict[str, Any] = field(repr=False)  # constructor arguments, defaults filled in
    instruments: tuple[str, ...]      # training.instruments
    target_instrument: str | None     # training.target_instrument
    samplerate: int                   # audio.sample_rate (44100 when absent)
    chunk_size: int                   # samples per window (see ``read_config``)
    num_overlap: int                  # windows covering each sample (inference.num_overlap)
    batch_size: int                   # inference.batch_size (1 when absent)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def channels(self) -> int:
        return 2 if self.model["stereo"] else 1

    @property
    def num_stems(self) -> int:
        """Outputs of the network: 1 with a target instrument, else one per instrument."""
        return 1 if self.target_instrument else len(self.instruments)

    @property
    def stems(self) -> tuple[str, ...]:
        """The stems ``separate`` gives, in order: the instruments; for a model with a
        target instrument, that one and then the mixture minus it, named after the other
        instrument (as audio-separator names its secondary stem)."""
        if not self.target_instrument:
            return self.instruments
        others = [i for i in self.instruments if i != self.target_instrument]
        return (self.target_instrument, others[0] if others else f"no_{self.target_instrument}")


def _fail(path: Path, reason: str) -> RoformerConfigError:
    return RoformerConfigError(f"{path}: {' '.join(str(reason).split())}")


def _section(path: Path, data: dict, key: str, required: bool) -> dict:
    value = data.get(key)
    if value is None:
        if required:
            raise _fail(path, f"no '{key}' section (not a ZFTurbo/UVR RoFormer config)")
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"'{key}' is a {type(value).__name__}, expected a mapping")
    return value


def detect_architecture(path: Path, model: dict) -> str:
    """BS-RoFormer (``freqs_per_bands``) or Mel-Band RoFormer (``num_bands``)."""
    bs, mel = "freqs_per_bands" in model, "num_bands" in model
    if bs and mel:
        raise _fail(path, "model has both freqs_per_bands (BS-RoFormer) and num_bands "
                          "(Mel-Band RoFormer)")
    if bs:
        return BS_ROFORMER
    if mel:
        return MEL_BAND_ROFORMER
    hint = ""
    for key in ("num_channels", "num_subbands", "dims", "growth", "bottleneck_factor",
                "channels", "n_heads"):
        if key in model:
            hint = f" (its model section has '{key}': another architecture, e.g. MDX23C/demucs/SCNet)"
            break
    raise _fail(path, "unsupported architecture: the model section has neither "
                      f"freqs_per_bands (BS-RoFormer) nor num_bands (Mel-Band RoFormer){hint}")


def _model_args(path: Path, arch: str, model: dict) -> dict[str, Any]:
    known = _COMMON_KEYS | _ARCH_KEYS[arch] | _IGNORED_KEYS
    unknown = sorted(k for k in model if k not in known)
    if unknown:
        raise _fail(path, f"unsupported {arch} option(s) {', '.join(unknown)}")
    if model.get("stft_window_fn") is not None:
        raise _fail(path, f"unsupported {arch} option stft_window_fn (only the Hann window)")
    args = dict(_DEFAULTS[arch])
    args.update({k: v for k, v in model.items() if k not in _IGNORED_KEYS})
    if "dim" not in args or "depth" not in args:
        raise _fail(path, "the model section needs dim and depth")
    for key in _INT_KEYS & args.keys():
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise _fail(path, f"model.{key} must be an integer, got {value!r}")
        args[key] = int(value)
        if args[key] < (0 if key == "linear_transformer_depth" else 1):
            raise _fail(path, f"model.{key} must be positive, got {value!r}")
    for key in _BOOL_KEYS & args.keys():
        if not isinstance(args[key], bool):
            raise _fail(path, f"model.{key} must be true or false, got {args[key]!r}")
    freqs = args["stft_n_fft"] // 2 + 1
    if args["stft_win_length"] > args["stft_n_fft"]:
        raise _fail(path, "model.stft_win_length is larger than stft_n_fft")
    if arch == BS_ROFORMER:
        bands = args["freqs_per_bands"]
        if not isinstance(bands, (list, tuple)) or len(bands) < 2 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bands):
            raise _fail(path, "model.freqs_per_bands must be a list of at least 2 positive integers")
        if sum(bands) != freqs:
            raise _fail(path, f"model.freqs_per_bands sums to {sum(bands)}, but "
                              f"stft_n_fft={args['stft_n_fft']} gives {freqs} frequencies")
        args["freqs_per_bands"] = tuple(bands)
    else:
        if args["num_bands"] < 2:
            raise _fail(path, "model.num_bands must be at least 2")
    return args


def read_config(path: Path | str) -> RoformerConfig:
    """Read and check a RoFormer yaml. Raises ``RoformerConfigError`` (one line, naming
    the file) for anything this package cannot run.

    Windowing, as audio-separator's MDXC path runs RoFormer models (what UVR and
    audio-separator users get): ``chunk_size = stft_hop_length * (inference.dim_t - 1)``
    when the config has ``inference.dim_t``, else ``audio.chunk_size``; ``num_overlap``
    from ``inference.num_overlap`` (8 when absent)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read: {exc.__class__.__name__}: {exc}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise _fail(path, f"not valid yaml for a model config: {' '.join(first[:2])}") from None
    if not isinstance(data, dict):
        raise _fail(path, "not a mapping (not a ZFTurbo/UVR RoFormer config)")
    model = _section(path, data, "model", True)
    audio = _section(path, data, "audio", False)
    training = _section(path, data, "training", True)
    inference = _section(path, data, "inference", False)

    arch = detect_architecture(path, model)
    args = _model_args(path, arch, model)

    instruments = training.get("instruments")
    if (not isinstance(instruments, (list, tuple)) or not instruments
            or not all(isinstance(i, str) and i for i in instruments)
            or len(set(instruments)) != len(instruments)):
        raise _fail(path, "training.instruments must be a list of distinct stem names")
    target = training.get("target_instrument") or None
    if target is not None and not isinstance(target, str):
        raise _fail(path, f"training.target_instrument must be a name, got {target!r}")
    num_stems = 1 if target else len(instruments)
    if args["num_stems"] != num_stems:
        what = (f"target_instrument {target!r}" if target
                else f"{len(instruments)} instruments and no target_instrument")
        raise _fail(path, f"model.num_stems={args['num_stems']} but training has {what} "
                          f"(needs num_stems={num_stems})")

    samplerate = audio.get("sample_rate", 44100)
    if arch == MEL_BAND_ROFORMER and "sample_rate" in model:
        samplerate = audio.get("sample_rate", model["sample_rate"])
    channels = 2 if args["stereo"] else 1
    if audio.get("num_channels", channels) != channels:
        raise _fail(path, f"audio.num_channels={audio.get('num_channels')} but model.stereo="
                          f"{str(args['stereo']).lower()}")
    dim_t = inference.get("dim_t")
    if dim_t is not None:
        chunk_size = args["stft_hop_length"] * (int(dim_t) - 1)
    else:
        chunk_size = audio.get("chunk_size")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise _fail(path, "no window length: needs inference.dim_t or audio.chunk_size")
    num_overlap = inference.get("num_overlap", 8)
    if (not isinstance(num_overlap, int) or isinstance(num_overlap, bool) or num_overlap < 1
            or chunk_size // num_overlap < 1):
        raise _fail(path, f"inference.num_overlap must be an integer from 1 to the chunk "
                          f"size, got {num_overlap!r}")
    batch_size = inference.get("batch_size", 1)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        batch_size = 1
    if not isinstance(samplerate, int) or samplerate < 1:
        raise _fail(path, f"audio.sample_rate must be a positive integer, got {samplerate!r}")
    return RoformerConfig(path=path, architecture=arch, model=args,
                          instruments=tuple(instruments), target_instrument=target,
                          samplerate=samplerate, chunk_size=chunk_size,
                          num_overlap=num_overlap, batch_size=batch_size, raw=data)
