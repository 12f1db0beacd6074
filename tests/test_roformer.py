"""RoFormer models (imaker.roformer) against the reference implementation.

The reference is audio-separator 0.47.1 (the test extra): its RoFormer classes
(``uvr_lib_v5.roformer``) and its MDXC separation path. ``Separator.load_model`` runs
offline from a model folder pre-seeded with ``download_checks.json``; the separation is
taken from the loaded ``MDXCSeparator.demix`` — the function ``Separator.separate`` calls
between reading the file and writing int16 files — so the float outputs are compared
(a further test goes through ``Separator.separate`` and its files).

Tiny random models of both architectures (real architecture, random weights), with the
windowing of their yaml (chunk size from ``inference.dim_t``, ``inference.num_overlap``).
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imaker import roformer
from imaker.roformer.config import TupleSafeLoader
from imaker.roformer.net import RoformerNet, mel_band_membership

SR = 44100
EP317_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
TINY_BANDS = (4,) * 8 + (8,) * 8 + (16,) * 6 + (32,) * 5 + (64, 97)  # sums to 513


def _tuple(values) -> str:
    return "!!python/tuple\n" + "".join(f"  - {v}\n" for v in values)


def _audio_section(hop: int, dim_t: int, n_fft: int) -> str:
    """The ``audio:`` section both architectures' configs share (ZFTurbo's format)."""
    return textwrap.dedent(f"""\
        audio:
          chunk_size: {hop * (dim_t - 1)}
          dim_f: 1024
          dim_t: {dim_t}
          hop_length: {hop}
          n_fft: {n_fft}
          num_channels: 2
          sample_rate: 44100
          min_mean_abs: 0.000
        """)


def bs_yaml(*, dim=16, depth=1, bands=TINY_BANDS, n_fft=1024, hop=512, dim_t=173,
            overlap=2, linear=1, target="vocals") -> str:
    return _audio_section(hop, dim_t, n_fft) + textwrap.dedent(f"""\
        model:
          dim: {dim}
          depth: {depth}
          stereo: true
          num_stems: 1
          time_transformer_depth: 1
          freq_transformer_depth: 1
          linear_transformer_depth: {linear}
          freqs_per_bands: """) + textwrap.indent(_tuple(bands), "  ") + textwrap.dedent(f"""\
          dim_head: 8
          heads: 2
          attn_dropout: 0.1
          ff_dropout: 0.1
          flash_attn: true
          dim_freqs_in: {n_fft // 2 + 1}
          stft_n_fft: {n_fft}
          stft_hop_length: {hop}
          stft_win_length: {n_fft}
          stft_normalized: false
          mask_estimator_depth: 2
          multi_stft_resolution_loss_weight: 1.0
          multi_stft_resolutions_window_sizes: !!python/tuple
          - 4096
          - 2048
          - 1024
          multi_stft_hop_size: 147
          multi_stft_normalized: False
        training:
          batch_size: 2
          instruments:
          - vocals
          - other
          target_instrument: {target}
          use_amp: true
        inference:
          batch_size: 1
          dim_t: {dim_t}
          num_overlap: {overlap}
        """)


def mel_yaml(*, dim=16, depth=1, num_bands=16, n_fft=1024, hop=512, dim_t=173, overlap=4,
             mask_depth=2) -> str:
    return _audio_section(hop, dim_t, n_fft) + textwrap.dedent(f"""\
        model:
          dim: {dim}
          depth: {depth}
          stereo: true
          num_stems: 2
          time_transformer_depth: 1
          freq_transformer_depth: 1
          num_bands: {num_bands}
          dim_head: 8
          heads: 2
          attn_dropout: 0
          ff_dropout: 0
          flash_attn: True
          dim_freqs_in: {n_fft // 2 + 1}
          sample_rate: 44100  # needed for mel filter bank from librosa
          stft_n_fft: {n_fft}
          stft_hop_length: {hop}
          stft_win_length: {n_fft}
          stft_normalized: False
          mask_estimator_depth: {mask_depth}
          multi_stft_resolution_loss_weight: 1.0
          multi_stft_resolutions_window_sizes: !!python/tuple
          - 4096
          - 2048
          multi_stft_hop_size: 147
          multi_stft_normalized: False
        training:
          batch_size: 4
          instruments:
          - vocals
          - other
          target_instrument: null
          use_amp: true
        inference:
          batch_size: 4
          dim_t: {dim_t}
          num_overlap: {overlap}
        """)


def write_model(folder: Path, name: str, text: str, seed: int) -> tuple[Path, Path]:
    """``<name>.yaml`` + ``<name>.ckpt`` with random weights (RMSNorm gains too)."""
    folder.mkdir(parents=True, exist_ok=True)
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(text)
    config = roformer.read_config(yaml_path)
    torch.manual_seed(seed)
    net = RoformerNet(config.architecture, **config.model)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.endswith("gamma") or key.endswith("temperature"):
                p.uniform_(0.5, 1.5)
            elif p.ndim >= 2:
                p.mul_(1.5)
    torch.save(net.state_dict(), folder / f"{name}.ckpt")
    return folder / f"{name}.ckpt", yaml_path


def music(seconds: float, seed: int = 1, peak: float = 0.5) -> np.ndarray:
    """A stereo test signal with music-like structure: a bass line and chords of
    harmonic tones with note envelopes, a vibrato 'voice', noise-burst drums."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    out = np.zeros((2, n))
    beat = 0.5
    for k in range(int(seconds / beat)):
        a, b = int(k * beat * SR), min(n, int((k + 1) * beat * SR))
        tt = t[a:b] - t[a]
        env = np.exp(-3 * tt)
        f0 = 55 * 2 ** (rng.integers(0, 12) / 12)
        bass = sum(np.sin(2 * np.pi * f0 * h * tt) / h for h in range(1, 5)) * env
        chord = sum(np.sin(2 * np.pi * 220 * 2 ** (i / 12) * tt + rng.uniform(0, 6))
                    for i in (0, 4, 7)) * env * 0.3
        out[:, a:b] += bass * 0.4 + np.stack([chord * 0.8, chord * 1.2])
        m = min(b - a, 2000)
        out[:, a:a + m] += rng.standard_normal((2, m)) * np.exp(-np.arange(m) / 300) * 0.5
    voice = np.sin(2 * np.pi * 440 * t + 3 * np.sin(2 * np.pi * 5 * t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.25 * t))
    out += np.stack([voice * 0.6, voice * 0.5])
    out += rng.standard_normal((2, n)) * 0.01
    return (out * (peak / np.abs(out).max())).astype(np.float32)


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    ref, est = ref.astype(np.float64), est.astype(np.float64)
    err = np.sum((ref - est) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.sum(ref ** 2) / err)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_model(folder, "tiny_bs_roformer", bs_yaml(), seed=1)
    write_model(folder, "tiny_mel_band_roformer", mel_yaml(), seed=2)
    # the layout of the instrumental fine-tunes (target_instrument: other)
    write_model(folder, "tiny_bs_roformer_inst", bs_yaml(target="other"), seed=3)
    # audio-separator's offline seed: the model list it would fetch, naming our files
    checks = {key: {} for key in ("vr_download_list", "mdx_download_list",
                                  "mdx_download_vip_list", "demucs_download_list",
                                  "mdx23c_download_list", "mdx23c_download_vip_list")}
    checks["roformer_download_list"] = {
        "Tiny BS-RoFormer": {"tiny_bs_roformer.ckpt": "tiny_bs_roformer.yaml"},
        "Tiny Mel-Band RoFormer": {"tiny_mel_band_roformer.ckpt": "tiny_mel_band_roformer.yaml"},
        "Tiny BS-RoFormer instrumental": {
            "tiny_bs_roformer_inst.ckpt": "tiny_bs_roformer_inst.yaml"},
    }
    (folder / "download_checks.json").write_text(json.dumps(checks))
    return folder


@pytest.fixture(scope="module")
def track() -> np.ndarray:
    return music(20.0)


def reference_separator(repo: Path, out: Path, name: str):
    pytest.importorskip("onnxruntime")
    from audio_separator.separator import Separator

    sep = Separator(log_level=logging.WARNING, model_file_dir=str(repo), output_dir=str(out),
                    output_format="WAV")
    sep.load_model(f"{name}.ckpt")
    return sep


# ----- config -----------------------------------------------------------------------------
def test_python_tuple_tag_loads_and_other_python_tags_are_refused(tmp_path):
    data = yaml.load("a: !!python/tuple\n- 1\n- 2\nb: [3]\n", Loader=TupleSafeLoader)
    assert data == {"a": (1, 2), "b": [3]}
    for evil in ("x: !!python/object/apply:os.system ['echo hi']\n",
                 "x: !!python/object:collections.OrderedDict {}\n",
                 "x: !!python/name:os.system\n"):
        with pytest.raises(yaml.constructor.ConstructorError):
            yaml.load(evil, Loader=TupleSafeLoader)
    bad = tmp_path / "evil.yaml"
    bad.write_text(bs_yaml().replace("heads: 2", "heads: !!python/object/apply:os.getpid []"))
    with pytest.raises(roformer.RoformerConfigError) as err:
        roformer.read_config(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg


def test_released_configs_read(repo):
    bs = roformer.read_config(repo / "tiny_bs_roformer.yaml")
    assert bs.architecture == roformer.BS_ROFORMER
    assert bs.model["freqs_per_bands"] == TINY_BANDS and bs.model["linear_transformer_depth"] == 1
    assert bs.stems == ("vocals", "other") and bs.num_stems == 1
    assert (bs.chunk_size, bs.num_overlap) == (512 * 172, 2)
    mel = roformer.read_config(repo / "tiny_mel_band_roformer.yaml")
    assert mel.architecture == roformer.MEL_BAND_ROFORMER and mel.model["num_bands"] == 16
    assert mel.stems == ("vocals", "other") and mel.num_stems == 2 and mel.num_overlap == 4


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.replace("  freqs_per_bands: ", "  num_channels: 4\n  growth: 128\n  x_freqs_per_bands: "),
     "unsupported architecture"),
    (lambda t: t.replace("  freqs_per_bands: ", "  num_bands: 60\n  freqs_per_bands: "), "both"),
    (lambda t: t.replace("  heads: 2", "  heads: 2\n  use_shared_bias: true"), "use_shared_bias"),
    (lambda t: t.replace("  - 97\n", "  - 98\n"), "sums to 514"),
    (lambda t: t.replace("target_instrument: vocals", "target_instrument: null"), "num_stems"),
    (lambda t: t.replace("model:", "model: [1]\nxmodel:"), "model"),
])
def test_unsupported_config_fails_at_once_with_one_line_naming_the_file(tmp_path, edit, reason):
    path = tmp_path / "odd_model.yaml"
    path.write_text(edit(bs_yaml()))
    (tmp_path / "odd_model.ckpt").write_bytes(b"never read")
    with pytest.raises(roformer.RoformerConfigError) as err:
        roformer.load(tmp_path / "odd_model.ckpt", path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and reason in msg, msg


def test_mdx23c_style_config_is_unsupported(tmp_path):
    path = tmp_path / "model_2_stem_full_band_8k.yaml"
    path.write_text("audio: {chunk_size: 261120, hop_length: 1024}\n"
                    "model: {num_channels: 128, num_subbands: 4, bottleneck_factor: 4}\n"
                    "training: {instruments: [Vocals, Instrumental], target_instrument: null}\n")
    with pytest.raises(roformer.RoformerConfigError, match=r"unsupported architecture") as err:
        roformer.read_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_not_matching_its_config_fails_with_one_line(repo, tmp_path):
    (tmp_path / "swapped.yaml").write_text((repo / "tiny_mel_band_roformer.yaml").read_text())
    (tmp_path / "swapped.ckpt").write_bytes((repo / "tiny_bs_roformer.ckpt").read_bytes())
    with pytest.raises(roformer.RoformerError) as err:
        roformer.load(tmp_path / "swapped.ckpt", tmp_path / "swapped.yaml")
    assert "\n" not in str(err.value) and str(tmp_path / "swapped.ckpt") in str(err.value)
    (tmp_path / "swapped.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(roformer.RoformerError, match="not a loadable checkpoint"):
        roformer.load(tmp_path / "swapped.ckpt", tmp_path / "swapped.yaml")


# ----- architecture -------------------------------------------------------------------------
@pytest.mark.parametrize("sr, n_fft, bands", [(44100, 2048, 60), (44100, 2048, 64),
                                               (44100, 1024, 16), (48000, 2048, 60),
                                               (44100, 4096, 128), (22050, 1024, 32)])
def test_mel_bands_equal_librosa_filters(sr, n_fft, bands):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=bands)
    ref[0][0] = 1.0
    ref[-1, -1] = 1.0
    assert np.array_equal(ref > 0, mel_band_membership(sr, n_fft, bands))


def _reference_net(config: roformer.RoformerConfig):
    from audio_separator.separator.roformer.roformer_loader import RoformerLoader

    loader = RoformerLoader()
    raw = dict(config.raw)
    normalized = loader.config_normalizer.normalize_config(raw, config.architecture,
                                                           apply_defaults=True, validate=True)
    if config.architecture == roformer.BS_ROFORMER:
        return loader._create_bs_roformer(normalized)
    return loader._create_mel_band_roformer(normalized)


@pytest.mark.parametrize("text", [
    bs_yaml(),
    bs_yaml(dim=8, depth=2, bands=EP317_BANDS, n_fft=2048, hop=441, dim_t=801, linear=0),
    mel_yaml(),
    mel_yaml(dim=8, depth=2, num_bands=60, n_fft=2048, hop=441, dim_t=801, mask_depth=1),
], ids=["bs-tiny", "bs-ep317-bands", "mel-tiny", "mel-kim-bands"])
def test_state_dict_keys_and_shapes_equal_reference(tmp_path, text):
    """Our module tree has exactly the reference's parameters (keys and shapes), and a
    state dict from the reference loads into ours with strict=True (and back)."""
    (tmp_path / "m.yaml").write_text(text)
    config = roformer.read_config(tmp_path / "m.yaml")
    ref = _reference_net(config)
    ours = RoformerNet(config.architecture, **config.model)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)


RELEASED = Path(__file__).parent / "data" / "roformer"


@pytest.mark.parametrize("name, architecture, parameters", [
    ("config_vocals_mel_band_roformer_kj", roformer.MEL_BAND_ROFORMER, 228_203_172),
    ("model_bs_roformer_ep_317_sdr_12.9755", roformer.BS_ROFORMER, 159_758_796)])
def test_released_configs_build_the_reference_parameters(name, architecture, parameters):
    """The published configs of the catalogue's two checkpoints, verbatim
    (tests/data/roformer/SOURCE.md): read as distributed, they build exactly the reference
    implementation's parameters (keys and shapes, so their checkpoints load strictly), at
    the published sizes (built without storage: no memory, no init)."""
    config = roformer.read_config(RELEASED / f"{name}.yaml")
    assert config.architecture == architecture and config.stems == ("vocals", "other")
    with torch.device("meta"):
        ref = _reference_net(config)
        ours = RoformerNet(config.architecture, **config.model)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert sum(torch.Size(s).numel() for s in our_shapes.values()) == parameters


@pytest.mark.parametrize("name", ["tiny_bs_roformer", "tiny_mel_band_roformer"])
def test_network_output_equals_reference_network(repo, name):
    """One window through both networks with the same weights (the reference loaded by
    its own RoformerLoader, strict)."""
    from audio_separator.separator.roformer.roformer_loader import RoformerLoader

    config = roformer.read_config(repo / f"{name}.yaml")
    result = RoformerLoader().load_model(str(repo / f"{name}.ckpt"), config.raw, "cpu")
    assert result.success, result.error_message
    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    x = torch.from_numpy(music(2.0, seed=5))[None]
    with torch.inference_mode():
        ref = result.model(x)
        ours = model.net(x)
    if config.num_stems == 1:
        ref = ref[:, None]
    assert ours.shape == ref.shape
    assert snr_db(ref.numpy(), ours.numpy()) > 80


@pytest.mark.parametrize("name", ["tiny_bs_roformer", "tiny_mel_band_roformer"])
def test_fused_weights_follow_the_parameters(repo, name):
    """The forward runs on weights derived from the parameters (folded norms, stacked
    bands): loading other weights into a used network gives what a fresh network with
    those weights gives, and so does an in-place change under no_grad or a fresh copy."""
    config = roformer.read_config(repo / f"{name}.yaml")
    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    x = torch.from_numpy(music(1.0, seed=6))[None]
    torch.manual_seed(11)
    other = RoformerNet(config.architecture, **config.model).eval()
    with torch.inference_mode():
        before = model.net(x)
        model.net.load_state_dict(other.state_dict(), strict=True)
        after, expect = model.net(x), other(x)
    assert snr_db(expect.numpy(), after.numpy()) > 100
    assert snr_db(before.numpy(), after.numpy()) < 20      # it did change
    with torch.no_grad():
        for key, p in model.net.named_parameters():
            if key.endswith("gamma") or p.ndim >= 2:
                p.mul_(1.1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.net(x)                                        # bf16 copies of the weights
    with torch.no_grad():
        for key, p in model.net.named_parameters():
            if key.endswith("gamma") or p.ndim >= 2:
                p.mul_(1.1)
    fresh = RoformerNet(config.architecture, **config.model).eval()
    fresh.load_state_dict(model.net.state_dict(), strict=True)
    with torch.inference_mode():
        assert snr_db(fresh(x).numpy(), model.net(x).numpy()) > 100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert snr_db(fresh(x).float().numpy(), model.net(x).float().numpy()) > 100


def test_precision_settings_govern_roformer():
    """DEMUCS_AUTOCAST (CUDA) and DEMUCS_CPU_AUTOCAST (CPU) pick the RoFormer network's
    autocast as they do demucs' (its auto: AMX-BF16 only)."""
    from imaker import separation

    assert separation.roformer_autocast("cpu", True, True) == "bf16"
    assert separation.roformer_autocast("cpu", True, False) is None
    assert separation.roformer_autocast("cpu", False, None) == (    # auto: AMX only
        "bf16" if separation.cpu_has_amx_bf16() else None)
    assert separation.roformer_autocast("cuda", True, False) == "bf16"
    assert separation.roformer_autocast("cuda:0", False, True) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host has CUDA")
def test_demucs_device_governs_roformer(repo):
    """DEMUCS_DEVICE picks the RoFormer model's device as it does demucs': cuda on a host
    without CUDA is one clear line, not a torch traceback."""
    from imaker import separation, stemset

    with pytest.raises(separation.SeparationError, match="^DEMUCS_DEVICE=cuda but no CUDA"):
        stemset.load("tiny_bs_roformer", repo, "cuda")
    assert str(stemset.load("tiny_bs_roformer", repo, "auto").device) == "cpu"


def test_converted_backends_do_not_apply_to_roformer(caplog):
    """DEMUCS_BACKEND: RoFormer runs on torch; a converted backend named explicitly is
    warned about once per setting."""
    from imaker import stemset

    stemset._BACKEND_WARNED.discard("openvino")
    with caplog.at_level(logging.WARNING, logger="imaker.stemset"):
        assert stemset.roformer_backend("auto", None) == "torch"
        assert stemset.roformer_backend("torch", None) == "torch"
        assert not caplog.records
        assert stemset.roformer_backend("openvino", None) == "torch"
        assert stemset.roformer_backend("OpenVINO", None) == "torch"
    assert len(caplog.records) == 1 and "does not apply to RoFormer" in caplog.text


@pytest.mark.parametrize("name", ["tiny_bs_roformer", "tiny_mel_band_roformer"])
def test_bf16_autocast_separation_close_to_fp32(repo, track, name):
    """bf16 autocast of the network core (DEMUCS_CPU_AUTOCAST) against the fp32 path: the
    same stems to the 40 dB bar (the published sizes: benchmarks/RESULTS.md)."""
    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    fp32 = model.separate(track)
    bf16 = model.separate(track, autocast="bf16")
    for stem in model.sources:
        snr = snr_db(fp32[stem], bf16[stem])
        print(f"{name} {stem}: bf16 {snr:.1f} dB")
        # measured 44.2/55.8 dB (BS) and 46.2/45.4 dB (Mel); < 200: bf16 really ran
        assert 40 <= snr < 200, (stem, snr)


# ----- separation ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_bs_roformer", "tiny_mel_band_roformer",
                                  "tiny_bs_roformer_inst"])
def test_separation_equals_audio_separator_mdxc(repo, track, tmp_path, name):
    """The acceptance bar: >= 40 dB SNR per stem against audio-separator's MDXC path (for
    an instrumental fine-tune's layout too: the network gives `other`, vocals = the
    mixture minus it)."""
    sep = reference_separator(repo, tmp_path, name)
    ref = sep.model_instance.demix(track.copy())
    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    ours = model.separate(track, batch_size=2)
    assert set(ours) == set(ref) == set(model.sources)
    if name.endswith("_inst"):
        assert model.sources == ("other", "vocals")
        assert np.allclose(ours["vocals"], track - ours["other"], atol=1e-5)
    for stem in model.sources:
        assert ours[stem].shape == track.shape and ours[stem].dtype == np.float32
        assert np.abs(ref[stem]).max() > 1e-3  # not a silent stem
        snr = snr_db(ref[stem], ours[stem])
        print(f"{name} {stem}: {snr:.1f} dB")
        assert snr >= 40, (stem, snr)


def test_separation_files_equal_audio_separator_separate(repo, track, tmp_path):
    """Through ``Separator.separate`` (file in, int16 WAV files out, each stem scaled to
    a 0.9 peak when louder): same stems within the int16 quantisation."""
    import soundfile

    name = "tiny_bs_roformer"
    src = tmp_path / "in.wav"
    soundfile.write(src, track.T, SR, subtype="FLOAT")
    sep = reference_separator(repo, tmp_path, name)
    files = sep.separate(str(src))
    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    ours = model.separate(track)
    assert len(files) == 2
    for stem in model.sources:
        path = next(tmp_path / f for f in files if f"({stem})" in f.lower() or f"_{stem}" in f.lower())
        got, rate = soundfile.read(path, dtype="float32", always_2d=True)
        assert rate == SR
        expect = ours[stem]
        peak = np.abs(expect).max()
        if peak > 0.9:
            expect = expect * (0.9 / peak)
        assert snr_db(expect, got.T[:, :expect.shape[1]]) >= 40


def test_short_track_equals_reference(repo, tmp_path):
    """A track shorter than one window (one short window, the iSTFT's own length)."""
    name = "tiny_mel_band_roformer"
    wav = music(1.3, seed=3)
    sep = reference_separator(repo, tmp_path, name)
    ref = sep.model_instance.demix(wav.copy(), override_model_segment_size=False)
    ours = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml").separate(wav)
    for stem in ours:
        assert snr_db(ref[stem], ours[stem]) >= 40


def test_streamed_output_equals_whole_output_in_order(repo):
    model = roformer.load(repo / "tiny_bs_roformer.ckpt", repo / "tiny_bs_roformer.yaml")
    wav = music(7.3, seed=4)
    whole = model.separate(wav, batch_size=1)
    pieces: list[tuple[int, np.ndarray]] = []
    calls = {"threads": 0}

    def threads() -> int:
        calls["threads"] += 1
        return 1

    assert model.separate(wav, batch_size=3, threads=threads,
                          sink=lambda start, chunk: pieces.append((start, chunk.copy()))) is None
    starts = [s for s, _ in pieces]
    assert starts[0] == 0 and starts == sorted(starts) and len(pieces) > 2
    assert all(s + c.shape[-1] == nxt for (s, c), nxt in zip(pieces, starts[1:] + [wav.shape[1]]))
    # bounded: no piece holds more than a batch of windows
    assert max(c.shape[-1] for _, c in pieces) <= model.chunk_size * 2
    streamed = np.concatenate([c for _, c in pieces], axis=-1)
    assert streamed.shape == (2, 2, wav.shape[1])
    for k, stem in enumerate(model.sources):
        assert snr_db(whole[stem], streamed[k]) > 90
    assert calls["threads"] >= 2
    # the complementary stem is the mixture minus the target
    np.testing.assert_allclose(whole["other"], wav - whole["vocals"], atol=1e-6)



@pytest.mark.parametrize("name", ["tiny_bs_roformer", "tiny_mel_band_roformer"])
def test_service_runs_concurrent_roformer_separations_in_shared_passes(repo, name):
    """What the separation service does on CUDA (issue 21), forced on the CPU: two RoFormer
    separations at once go through the model's one WindowBatcher, whose passes hold
    windows of both, and each gets what it gets alone (fp32: >= 100 dB)."""
    import threading

    from imaker.separator.service import SeparateRequest, Service, _Separator
    from imaker.settings import Separation

    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    wavs = [music(9.0, seed=5), music(7.0, seed=6, peak=0.25)]
    alone = [model.separate(w) for w in wavs]
    assert Service(concurrency=2).batcher_for(model) is None   # CPU: the cores split
    service = Service(concurrency=2, cross_batch=True)
    batcher = service.batcher_for(model)
    assert batcher is not None and service.batcher_for(model) is batcher  # one per model
    batcher.gather_s = 0.2   # a busy test machine: give the other's windows time
    req = SeparateRequest(job_id="x", source="/s", stems_dir="/d",
                          separation=Separation(cpu_autocast=False))
    both = threading.Barrier(2)
    together: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            both.wait()
            together[i] = _Separator(service, req, threading.Event()).separate(model, wavs[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    windows = sum(len(roformer.window_starts(w.shape[1], model.chunk_size,
                                             model.chunk_size // model.num_overlap))
                  for w in wavs)
    print(f"{name}: {batcher.passes} passes for {windows} windows, {batcher.merged} shared")
    assert batcher.merged > 0 and batcher.passes < windows, (batcher.passes, batcher.merged)
    for got, ref in zip(together, alone):
        for stem in model.sources:
            assert got[stem].shape == ref[stem].shape
            snr = snr_db(ref[stem], got[stem])
            print(f"{name} {stem}: shared passes {snr:.1f} dB")
            assert snr >= 100, (stem, snr)


def test_bench_roformer_throughput_mode_matches_the_reference(tmp_path, monkeypatch):
    """benchmarks/bench_roformer.py's throughput mode (issue 21's GPU figure, run by
    benchmarks/gpu.sh step 6 on CUDA), dry-run on the CPU with the tiny BS-RoFormer: two
    different tracks at once through the service's separation path and shared WindowBatcher
    (cross_batch forced) against audio-separator's demix one track after another. Every stem
    of every track is within 40 dB in bf16 and 100 dB in fp32 of the reference, and the
    figures the GPU run reports are there."""
    import argparse
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_roformer.py"
    spec = importlib.util.spec_from_file_location("bench_roformer_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "roformer.json"
    args = argparse.Namespace(model="ep317", size="tiny", tracks=2, seconds=5.0, device="cpu",
                              precision="bf16,fp32", song_dir=None, no_reference=False,
                              threads=1, json=out)
    threads = torch.get_num_threads()
    try:
        assert bench.throughput(args) == 0
    finally:
        torch.set_num_threads(threads)
    [row] = json.loads(out.read_text())
    assert row["architecture"] == "bs_roformer" and row["tracks"] == 2
    assert row["reference"]["precision"] == "fp32" and row["reference"]["audio_s_per_s"] > 0
    for label, bar in (("bf16", 40.0), ("fp32", 100.0)):
        ours = row["ours"][label]
        assert ours["precision"] == label and ours["passes"] >= 1
        assert ours["audio_s_per_s"] > 0 and ours["ratio_vs_reference"] > 0
        for stem, snrs in ours["snr_db"].items():
            assert len(snrs) == 2 and min(snrs) >= bar, (label, stem, snrs)


def test_model_identity(repo):
    model = roformer.load(repo / "tiny_mel_band_roformer.ckpt",
                          repo / "tiny_mel_band_roformer.yaml")
    assert model.sha256 == roformer.file_sha256(repo / "tiny_mel_band_roformer.ckpt")
    info = model.describe()
    assert info["architecture"] == "mel_band_roformer" and info["stems"] == ["vocals", "other"]
    assert model.samplerate == SR and model.channels == 2
    assert roformer.is_roformer("tiny_mel_band_roformer", repo)
    assert not roformer.is_roformer("htdemucs", repo)
    with pytest.raises(roformer.RoformerError, match="missing"):
        roformer.model_files("nope", repo)


def test_scan_lists_models_and_unusable_configs(repo, tmp_path):
    for f in repo.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "broken.ckpt").write_bytes(b"x")
    (tmp_path / "broken.yaml").write_text("model: {dims: [1]}\ntraining: {instruments: [a]}\n")
    (tmp_path / "htdemucs.yaml").write_text("models: ['955717e8']\n")  # a demucs bag
    found = {m.name: m for m in roformer.scan(tmp_path)}
    assert set(found) == {"broken", "tiny_bs_roformer", "tiny_mel_band_roformer",
                          "tiny_bs_roformer_inst"}
    assert found["tiny_bs_roformer_inst"].stems == ("other", "vocals")
    assert found["tiny_bs_roformer"].architecture == "bs_roformer"
    assert found["tiny_mel_band_roformer"].stems == ("vocals", "other")
    assert found["broken"].architecture is None and "unsupported architecture" in found["broken"].error
    assert found["tiny_bs_roformer"].size_bytes == (repo / "tiny_bs_roformer.ckpt").stat().st_size


def test_load_makes_the_checkpoint_the_parameters_once_and_fp16_runs_as_fp32(repo, tmp_path,
                                                                            monkeypatch):
    """``load`` builds the network without storage and assigns the checkpoint's tensors
    (no random init: the weights are in memory once while loading); a half-precision
    checkpoint (some are distributed so) loads as fp32 parameters of the same values, and
    separates as the fp32 checkpoint of those values does."""
    name = "tiny_mel_band_roformer"
    inits = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_",
                        lambda *a, **k: inits.append(a[0].device.type) or a[0])
    model = roformer.load(repo / f"{name}.ckpt", repo / f"{name}.yaml")
    # nn.Linear's random init ran on parameters without storage only
    assert inits and set(inits) == {"meta"}
    state = torch.load(repo / f"{name}.ckpt", weights_only=True)
    got = model.net.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    half = {k: v.half() for k, v in state.items()}
    torch.save(half, tmp_path / "half.ckpt")
    torch.save({k: v.float() for k, v in half.items()}, tmp_path / "rounded.ckpt")
    for stem in ("half", "rounded"):
        (tmp_path / f"{stem}.yaml").write_text((repo / f"{name}.yaml").read_text())
    a = roformer.load(tmp_path / "half.ckpt", tmp_path / "half.yaml")
    b = roformer.load(tmp_path / "rounded.ckpt", tmp_path / "rounded.yaml")
    assert all(p.dtype == torch.float32 for p in a.net.parameters())
    wav = music(3.0)
    outs = []
    for m in (a, b):
        chunks = []
        m.separate(wav, sink=lambda start, c: chunks.append(c.copy()))
        outs.append(np.concatenate(chunks, axis=-1))
    assert np.array_equal(outs[0], outs[1])
