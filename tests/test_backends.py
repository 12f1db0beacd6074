"""Converted CPU backends (imaker.backends, DEMUCS_BACKEND) against fp32 ``apply_model``.

The test model (``tiny_htdemucs``, 7.8 s segment like the released htdemucs; a 13 s input
spans two overlapping windows plus the short last one) runs through our segment loop with the core network on each
installed converted backend; the conversion is cached beside the model repo and reused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import stop_separator
from imaker import backends, htcore, separation
from imaker.devmodel import build_model_repo
from imaker.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
CONVERTED = [b for b in ("onnx", "openvino", "aoti") if backends.available(b)]
#: the backend ``auto`` ships (must be installed by the test extra)
WINNER = backends.AUTO_ORDER[0]


def _snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum()
                               / ((ref.astype(np.float64) - est) ** 2).sum()))


def _wav(seconds: float = 13.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    n = int(seconds * 44100)
    t = np.arange(n) / 44100
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(n)
    return np.stack([mono, 0.7 * mono + 0.02 * rng.standard_normal(n)]).astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return build_model_repo(tmp_path_factory.mktemp("backend_models"), "tiny_htdemucs")


@pytest.fixture(scope="module")
def reference(repo):
    """fp32 ``demucs.apply.apply_model`` (batch 0), shifts=1 with seeded offsets."""
    loaded = separation.load_model("tiny_htdemucs", repo, "cpu")
    random.seed(7)
    return separation.separate(loaded, _wav(), batch_size=0, shifts=1, backend="torch")


def test_the_shipped_backend_is_installed_by_the_test_extra():
    assert backends.available(WINNER), f"{WINNER} is what DEMUCS_BACKEND=auto ships"
    assert WINNER in CONVERTED


@pytest.mark.parametrize("backend", CONVERTED)
def test_backend_stems_match_fp32_apply_model_to_40_db(repo, reference, backend):
    loaded = separation.load_model("tiny_htdemucs", repo, "cpu")
    random.seed(7)
    out = separation.separate(loaded, _wav(), batch_size=1, shifts=1, backend=backend,
                              cpu_autocast=False)
    snrs = {k: _snr_db(reference[k], out[k]) for k in loaded.sources}
    assert all(s >= 40 for s in snrs.values()), snrs
    # it really ran on the converted core: its file is in the cache folder
    sub = loaded.model.models[0]
    assert backends.artifact_path(sub, repo, backend).is_file()
    assert any(r.backend == backend and r.model is sub for r in backends._RUNNERS.values())


@pytest.mark.skipif(not backends.available("openvino"), reason="needs openvino")
def test_openvino_bf16_matches_fp32_apply_model_to_40_db(repo, reference):
    """What auto runs where DEMUCS_CPU_AUTOCAST picks bf16 (the same 40 dB bar as torch's
    bf16 autocast). On a CPU without native bf16 the engine stays f32."""
    loaded = separation.load_model("tiny_htdemucs", repo, "cpu")
    random.seed(7)
    out = separation.separate(loaded, _wav(), batch_size=1, shifts=1, backend="openvino",
                              cpu_autocast=True)
    snrs = {k: _snr_db(reference[k], out[k]) for k in loaded.sources}
    assert all(s >= 40 for s in snrs.values()), snrs
    runs = [r for r in backends._RUNNERS.values()
            if r.backend == "openvino" and r.precision == "bf16"]
    assert runs
    native = separation.cpu_has_native_bf16()
    assert all(r.engine.precision == ("bf16" if native else "f32") for r in runs)


def test_the_released_architectures_transformer_width_converts_too(tmp_path):
    """The released htdemucs runs its cross-domain transformer at ``bottom_channels=512``
    (1x1 convs around it: ``htcore``'s other branch); a tiny model with that option, through
    the split forward and the backend ``auto`` ships, against fp32 apply_model."""
    repo = build_model_repo(tmp_path, "tiny_bottom", bottom_channels=16)
    loaded = separation.load_model("tiny_bottom", repo, "cpu")
    model = loaded.model.models[0]
    assert model.bottom_channels == 16 and hasattr(model, "channel_upsampler")
    mix = torch.randn(1, 2, 5 * 44100)
    with torch.inference_mode():
        assert _snr_db(model(mix).numpy(), htcore.split_forward(
            model, mix, htcore.HTCore(model), draw=False).numpy()) >= 120
    random.seed(7)
    ref = separation.separate(loaded, _wav(8.0), batch_size=0, shifts=1, backend="torch")
    random.seed(7)
    out = separation.separate(loaded, _wav(8.0), batch_size=1, shifts=1, backend=WINNER,
                              cpu_autocast=False)
    snrs = {k: _snr_db(ref[k], out[k]) for k in loaded.sources}
    assert all(s >= 40 for s in snrs.values()), snrs
    assert backends.artifact_path(model, repo, WINNER).is_file()


def test_split_forward_is_the_model_forward_and_keeps_random_draws(repo):
    """The same as ``model(mix)`` to float32 rounding (the masking and iSTFT are
    ``htcore.masked_ispec``'s, below), drawing from ``random`` as forward does."""
    model = separation.load_model("tiny_htdemucs", repo, "cpu").model.models[0]
    mix = torch.randn(1, 2, 5 * 44100)  # shorter than the segment: padded, cut back
    with torch.inference_mode():
        random.seed(1)
        ref = model(mix)
        after_ref = random.random()
        random.seed(1)
        out = htcore.split_forward(model, mix, htcore.HTCore(model), draw=False)
        after_split = random.random()
    assert out.shape == ref.shape
    assert _snr_db(ref.numpy(), out.numpy()) >= 120
    assert after_ref == after_split  # the torch core draws like forward does


def test_masked_ispec_is_demucs_mask_and_ispec(repo):
    """The frequency branch's masking + iSTFT written once into the padded spectrogram
    (``htcore.masked_ispec``) against demucs' ``_mask`` + ``_ispec`` (``torch.istft``) on
    a random network output: float32 rounding apart (>= 120 dB; measured ~140), every
    sample, at the window's length and at a shorter one."""
    model = separation.load_model("tiny_htdemucs", repo, "cpu").model.models[0]
    length = htcore.training_length(model)
    torch.manual_seed(0)
    _, z, mag = htcore.core_inputs(model, 0.1 * torch.randn(1, 2, length))
    x = torch.randn(2, len(model.sources), *mag.shape[1:])  # a batch of two windows
    z = torch.cat([z, z])
    with torch.inference_mode():
        ref = model._ispec(model._mask(z, x), length)
        ours = htcore.masked_ispec(model, x, length)
        assert ours.shape == ref.shape == (2, len(model.sources), 2, length)
        assert _snr_db(ref.numpy(), ours.numpy()) >= 120
        assert float((ref - ours).abs().max()) < 1e-4 * float(ref.abs().max())
        shorter = length - 3 * model.hop_length - 77
        ref = model._ispec(model._mask(z, x), shorter)
        ours = htcore.masked_ispec(model, x, shorter)
        assert ours.shape == ref.shape and _snr_db(ref.numpy(), ours.numpy()) >= 120


def test_second_start_reuses_the_cached_conversion(tmp_path):
    """Two fresh processes on a fresh repo: the first converts, the second does not (and the
    cache file is the one the first wrote)."""
    build_model_repo(tmp_path, "tiny_htdemucs", seed=3)
    script = (
        "import json, numpy as np, sys; from pathlib import Path;"
        "from imaker import backends, separation;"
        "l = separation.load_model('tiny_htdemucs', Path(sys.argv[1]), 'cpu');"
        "w = np.zeros((2, 44100), np.float32); w[:, ::50] = 0.5;"
        f"separation.separate(l, w, batch_size=1, backend='{WINNER}', cpu_autocast=False);"
        "print(json.dumps({'conversions': backends.conversions, 'path': str("
        f"backends.artifact_path(l.model.models[0], l.repo, '{WINNER}'))}}))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if len(runs) == 1:
            mtime = Path(runs[0]["path"]).stat().st_mtime_ns
    assert [r["conversions"] for r in runs] == [1, 0]
    path = Path(runs[1]["path"])
    assert path.parent == tmp_path / ".imaker-cache" and path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob("*.part*"))  # written atomically, nothing left over


def test_cache_key_changes_with_the_weights_and_every_model_of_a_bag_gets_its_own(tmp_path):
    build_model_repo(tmp_path, "m1", seed=1)
    build_model_repo(tmp_path, "m2", seed=2)
    a = separation.load_model("m1", tmp_path, "cpu").model.models[0]
    b = separation.load_model("m2", tmp_path, "cpu").model.models[0]
    assert backends.onnx_path(a, tmp_path) != backends.onnx_path(b, tmp_path)
    assert backends.onnx_path(a, tmp_path).name.endswith(f"-{htcore.training_length(a)}.onnx")
    with torch.no_grad():
        before = backends._model_key(a)
        next(a.parameters()).add_(1e-3)
        assert backends._model_key(a) != before


def test_auto_picks_a_converted_backend_only_for_fp32_htdemucs_on_the_cpu(repo):
    model = separation.load_model("tiny_htdemucs", repo, "cpu").model
    assert backends.choose("auto", "cpu", model, None) == WINNER
    # bf16 on the CPU (native bf16): only OpenVINO computes in bf16 itself
    assert backends.choose("auto", "cpu", model, "bf16") == \
        ("openvino" if WINNER == "openvino" else "torch")
    assert backends.choose("onnx", "cpu", model, "bf16") == "torch"
    assert backends.choose("auto", "cuda", model, None) == "torch"
    assert backends.choose("torch", "cpu", model, None) == "torch"
    assert backends.choose("onnx", "cuda", model, None) == "torch"  # warned, not applied
    with pytest.raises(backends.BackendError):
        backends.choose("tensorrt", "cpu", model, None)

    from demucs.hdemucs import HDemucs

    other = HDemucs(sources=["drums", "bass", "other", "vocals"], channels=8)
    assert backends.choose("auto", "cpu", other, None) == "torch"


def test_demucs_backend_setting_reaches_the_service_request(tmp_path):
    from imaker.separator.client import SeparatorClient
    from imaker.separator.service import SeparateRequest
    from resources import build_resources

    assert load_settings({"IMAKER_DATA": str(tmp_path)}).separation.backend == "auto"
    settings = load_settings({"IMAKER_DATA": str(tmp_path), "DEMUCS_BACKEND": "ONNX"})
    assert settings.separation.backend == "onnx"
    assert SeparatorClient.from_settings(settings).separation.backend == "onnx"
    run_settings = build_resources(settings)["settings"].get()
    assert SeparatorClient.from_settings(run_settings).separation.backend == "onnx"
    assert SeparateRequest(job_id="j", source="s", stems_dir="d",
                           separation={"backend": "openvino"}).separation.backend == "openvino"
    with pytest.raises(SettingsError):
        load_settings({"IMAKER_DATA": str(tmp_path), "DEMUCS_BACKEND": "tensorrt"})


def test_service_runs_one_separation_at_a_time_where_openvino_runs(monkeypatch):
    from imaker.separator.service import Service

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DEMUCS_BACKEND", "torch")
    assert Service().concurrency == Service().cores  # eager: the cores split
    monkeypatch.setenv("DEMUCS_BACKEND", "auto")
    assert Service().concurrency == (1 if backends.available("openvino") else Service().cores)
    assert Service(concurrency=3).concurrency == 3  # SEPARATOR_CONCURRENCY still wins


def test_a_preloaded_service_compiles_before_it_answers(repo, source_m4a, tmp_path, monkeypatch):
    """`imaker separator serve --preload` (what `imaker ingest` starts) converts and compiles
    the backend with one short separation before /health answers: the first track's
    separation then compiles nothing."""
    from dagster_server import free_port
    from imaker.separator.client import SeparatorClient

    monkeypatch.setenv("IMAKER_ENV_FILE", "")
    for key, value in {"DEMUCS_MODEL": "tiny_htdemucs", "DEMUCS_MODEL_REPO": str(repo),
                       "DEMUCS_DEVICE": "cpu", "DEMUCS_BACKEND": WINNER,
                       "SEPARATOR_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    client = SeparatorClient.from_settings(load_settings())
    client.ensure_running(preload=True)
    try:
        ready = client.health()
        assert ready["compiles"] >= 1 and ready["completed"] == 0, ready
        meta = client.separate("first", source_m4a, tmp_path / "stems")
        assert meta["job_id"] == "first" and len(meta["sources"]) == 4, meta
        assert (tmp_path / "stems" / "stems.json").is_file()
        after = client.health()
        assert after["completed"] == 1 and after["compiles"] == ready["compiles"], after
    finally:
        stop_separator(client.port)


def test_a_released_model_takes_its_compiled_engine_with_it(repo):
    """The separation service releases a model no running separation plans
    (``stemset.release_except``); its converted backend's runner (the compiled engine,
    which holds the network) goes too, so neither stays in memory for the service's life."""
    import gc
    import weakref

    from imaker import stemset

    loaded = stemset.load("tiny_htdemucs", repo, "cpu")
    separation.separate(loaded, _wav(2.0), backend=WINNER, threads=lambda: 1)
    members = [weakref.ref(m) for m in getattr(loaded.model, "models", None) or [loaded.model]]
    assert all(any(run.model is m() for run in backends._RUNNERS.values()) for m in members)
    del loaded
    others = [(k[0], k[1]) for cache in (separation._CACHE, stemset._ROFORMERS) for k in cache
              if (k[0], k[1]) != ("tiny_htdemucs", str(repo))]  # other tests' models stay
    assert stemset.release_except(others) == ["tiny_htdemucs"]
    gc.collect()
    # the networks are gone: no runner (compiled engine) of any backend holds them any more
    assert all(m() is None for m in members)
