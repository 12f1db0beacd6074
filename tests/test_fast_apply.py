"""The batched segment-inference path (imaker.fast_apply) against demucs' own apply_model.

Tiny random HTDemucs models with a 3 s segment, so a 13 s input spans 6 overlapping windows
(stride 2.25 s at overlap 0.25) and a short last window padded with context."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import yaml

from imaker import fast_apply, separation
from imaker.devmodel import build_model_repo
from imaker.settings import SettingsError, load_settings

SEGMENT = 3.0
SR = 44100


@pytest.fixture(scope="module")
def short_repo(tmp_path_factory):
    """``tiny_a`` and ``tiny_b`` (3 s segment, different seeds) and ``tiny_bag``: both, with
    per-source weights."""
    repo = tmp_path_factory.mktemp("fast_models")
    build_model_repo(repo, "tiny_a", seed=1, segment=SEGMENT)
    build_model_repo(repo, "tiny_b", seed=2, segment=SEGMENT)
    sigs = [yaml.safe_load((repo / f"{n}.yaml").read_text())["models"][0]
            for n in ("tiny_a", "tiny_b")]
    (repo / "tiny_bag.yaml").write_text(yaml.safe_dump(
        {"models": sigs, "weights": [[1.0, 0.5, 2.0, 1.0], [0.5, 1.0, 1.0, 3.0]]}))
    return repo


def _mix(seconds: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    t = torch.arange(n) / SR
    tone = 0.3 * torch.sin(2 * np.pi * 220 * t) + 0.2 * torch.randn(n, generator=gen)
    return torch.stack([tone, 0.7 * tone + 0.05 * torch.randn(n, generator=gen)])[None]


def _snr_db(ref: torch.Tensor, est: torch.Tensor) -> list[float]:
    """Per source (dim 1), over batch, channels and time."""
    out = []
    for k in range(ref.shape[1]):
        noise = (ref[:, k] - est[:, k]).double().pow(2).sum()
        power = ref[:, k].double().pow(2).sum()
        out.append(float("inf") if noise == 0 else float(10 * torch.log10(power / noise)))
    return out


def _reference(model, mix, **kwargs):
    from demucs.apply import apply_model

    with torch.inference_mode():
        return apply_model(model, mix, split=True, progress=False, **kwargs)


def test_batched_matches_apply_model_across_many_windows(short_repo):
    model = separation.load_model("tiny_a", short_repo, "cpu").model
    mix = _mix(13.3)
    ref = _reference(model, mix, shifts=0, overlap=0.25)
    for batch in (1, 4):
        est = fast_apply.apply_model_batched(model, mix, shifts=0, overlap=0.25,
                                             batch_size=batch)
        assert est.shape == ref.shape and est.dtype == torch.float32
        assert min(_snr_db(ref, est)) >= 40, (batch, _snr_db(ref, est))


def test_bag_with_weights_and_shifts_matches_apply_model(short_repo):
    """A bag of two models with per-source weights and shifts=1: the second model's random
    shift offset depends on how many forward passes the first one ran (demucs' transformer
    draws from ``random`` once per forward), so this also checks the ``random`` state."""
    model = separation.load_model("tiny_bag", short_repo, "cpu").model
    assert len(model.models) == 2
    mix = _mix(9.0, seed=1)
    random.seed(1234)
    ref = _reference(model, mix, shifts=1, overlap=0.25)
    after_ref = random.random()
    random.seed(1234)
    est = fast_apply.apply_model_batched(model, mix, shifts=1, overlap=0.25, batch_size=3)
    assert random.random() == after_ref
    assert min(_snr_db(ref, est)) >= 40, _snr_db(ref, est)


def test_short_input_segment_override_and_2d_input(short_repo):
    model = separation.load_model("tiny_a", short_repo, "cpu").model
    short = _mix(1.7, seed=2)  # shorter than one segment: one padded window
    ref = _reference(model, short, shifts=0)
    est = fast_apply.apply_model_batched(model, short[0], shifts=0, batch_size=4)
    assert est.shape == ref.shape[1:]
    assert min(_snr_db(ref, est[None])) >= 40
    mix = _mix(5.0, seed=3)  # segment override below the model's: the model pads inside
    ref = _reference(model, mix, shifts=0, overlap=0.5, segment=2.0)
    est = fast_apply.apply_model_batched(model, mix, shifts=0, overlap=0.5, segment=2.0,
                                         batch_size=2)
    assert min(_snr_db(ref, est)) >= 40


def test_autocast_keeps_spectrograms_fp32(short_repo, monkeypatch):
    import demucs.htdemucs as htdemucs

    model = separation.load_model("tiny_b", short_repo, "cpu").model
    mix = _mix(4.0, seed=4)
    ref = fast_apply.apply_model_batched(model, mix, shifts=0, batch_size=2)
    seen = []

    def spy(fn):
        def wrapped(x, *args, **kwargs):
            seen.append((fn.__name__, x.dtype, torch.is_autocast_enabled("cpu")))
            return fn(x, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(htdemucs, "spectro", spy(htdemucs.spectro))
    monkeypatch.setattr(htdemucs, "ispectro", spy(htdemucs.ispectro))
    est = fast_apply.apply_model_batched(model, mix, shifts=0, batch_size=2,
                                         autocast_dtype="bf16")
    assert {name for name, _, _ in seen} == {"spectro", "ispectro"}
    assert all(dtype in (torch.float32, torch.complex64) and not autocast
               for _, dtype, autocast in seen), seen
    assert est.dtype == torch.float32 and torch.isfinite(est).all()
    assert min(_snr_db(ref, est)) >= 40  # the fast path's quality bar (measured ~45-55 dB)
    with pytest.raises(ValueError):
        fast_apply.apply_model_batched(model, mix, autocast_dtype="int8")


def test_separate_uses_batched_path_when_asked(short_repo, monkeypatch):
    loaded = separation.load_model("tiny_a", short_repo, "cpu")
    wav = _mix(7.0, seed=5)[0].numpy() * 0.5 + 0.01
    calls = []
    real = fast_apply.apply_model_batched

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_apply, "apply_model_batched", spy)
    random.seed(7)
    fast = separation.separate(loaded, wav, batch_size=4)
    assert len(calls) == 1 and calls[0]["batch_size"] == 4
    assert calls[0]["autocast_dtype"] is None  # autocast is for CUDA only
    random.seed(7)
    plain = separation.separate(loaded, wav, batch_size=0)
    assert len(calls) == 1  # batch_size=0: demucs' apply_model
    random.seed(7)
    auto = separation.separate(loaded, wav)  # auto on the CPU: our loop, one segment a pass
    assert len(calls) == 2 and calls[1]["batch_size"] == separation.DEFAULT_CPU_BATCH_SIZE
    assert set(fast) == set(plain) == set(auto) == set(loaded.sources)
    for name in loaded.sources:
        assert fast[name].shape == wav.shape and fast[name].dtype == np.float32
        for other in (fast, auto):
            snr = _snr_db(torch.from_numpy(plain[name])[None, None],
                          torch.from_numpy(other[name])[None, None])[0]
            assert snr >= 40, (name, snr)


def test_cpu_bf16_separation_matches_the_fp32_reference_to_40_db(short_repo):
    """The CPU bf16 path (default on CPUs with native bf16) through ``separate`` — batched
    loop, shift, overlap-add, de-normalisation — against demucs' fp32 ``apply_model`` on the
    same input with the same shift offset: >= 40 dB SNR per stem."""
    loaded = separation.load_model("tiny_a", short_repo, "cpu")
    wav = (_mix(9.0, seed=9)[0].numpy() * 0.6).astype(np.float32)
    random.seed(11)
    ref = separation.separate(loaded, wav, batch_size=0)  # demucs apply_model, fp32
    random.seed(11)
    fast = separation.separate(loaded, wav, batch_size=1, cpu_autocast=True)
    for name in loaded.sources:
        snr = _snr_db(torch.from_numpy(ref[name])[None, None],
                      torch.from_numpy(fast[name])[None, None])[0]
        assert 40 <= snr < 200, (name, snr)  # < 200: bf16 really ran (not bit-identical)


def test_inference_plan_and_settings():
    assert separation.inference_plan("cuda", None, True) == (separation.DEFAULT_CUDA_BATCH_SIZE,
                                                              "bf16")
    assert separation.inference_plan("cuda:1", 4, False) == (4, None)
    assert separation.inference_plan("cuda", 0, True) == (0, None)
    assert separation.inference_plan("cpu", None, True) == (1, None)
    assert separation.inference_plan("cpu", 0, True) == (0, None)
    assert separation.inference_plan("cpu", 8, True) == (8, None)
    assert separation.inference_plan("cpu", None, True, cpu_autocast=True) == (1, "bf16")
    assert separation.inference_plan("cpu", 0, True, cpu_autocast=True) == (0, None)
    assert separation.inference_plan("cuda", 8, False, cpu_autocast=True) == (8, None)
    native = separation.cpu_has_native_bf16()
    assert separation.inference_plan("cpu", None, True, cpu_autocast=None) == (
        1, "bf16" if native else None)
    assert load_settings({}).separation.cpu_autocast is None  # auto
    assert load_settings({"DEMUCS_CPU_AUTOCAST": "auto"}).separation.cpu_autocast is None
    assert load_settings({"DEMUCS_CPU_AUTOCAST": "true"}).separation.cpu_autocast is True
    assert load_settings({"DEMUCS_CPU_AUTOCAST": "false"}).separation.cpu_autocast is False
    with pytest.raises(separation.SeparationError):
        separation.inference_plan("cpu", -1, True)
    assert load_settings({}).separation.batch_size is None
    assert load_settings({}).separation.autocast is True
    assert load_settings({"DEMUCS_BATCH_SIZE": "auto"}).separation.batch_size is None
    assert load_settings({"DEMUCS_BATCH_SIZE": "0"}).separation.batch_size == 0
    assert load_settings({"DEMUCS_BATCH_SIZE": "16", "DEMUCS_AUTOCAST": "false"}
                         ).separation.autocast is False
    assert load_settings({"DEMUCS_BATCH_SIZE": "16"}).separation.batch_size == 16
    for bad in ("-2", "many"):
        with pytest.raises(SettingsError):
            load_settings({"DEMUCS_BATCH_SIZE": bad})


def test_separator_resource_passes_batch_settings(tmp_path):
    from resources import SettingsResource, build_resources

    settings = load_settings({"IMAKER_DATA": str(tmp_path), "DEMUCS_BATCH_SIZE": "4",
                              "DEMUCS_AUTOCAST": "0", "DEMUCS_CPU_AUTOCAST": "1"})
    resource = build_resources(settings)["settings"]
    assert isinstance(resource, SettingsResource)
    sep = resource.get().separation
    assert sep.batch_size == 4 and sep.autocast is False and sep.cpu_autocast is True


def _collect(chunks: list) -> callable:
    def sink(start, chunk):
        assert start == sum(c.shape[-1] for c in chunks), "chunks arrive in order, no gap"
        chunks.append(chunk.clone())
    return sink


@pytest.mark.parametrize("batch", [1, 3])
def test_streaming_sink_gives_the_same_output_in_bounded_chunks(short_repo, batch):
    """With a sink the output is handed over in order while the windows run; glued back it
    is bit-identical to the returned tensor, and no chunk (hence no buffer) spans the whole
    track: 13.3 s with 3 s segments must come in several pieces."""
    model = separation.load_model("tiny_a", short_repo, "cpu").model
    mix = _mix(13.3)
    random.seed(7)
    whole = fast_apply.apply_model_batched(model, mix[0], shifts=1, batch_size=batch)
    chunks: list[torch.Tensor] = []
    random.seed(7)
    assert fast_apply.apply_model_batched(model, mix[0], shifts=1, batch_size=batch,
                                          sink=_collect(chunks)) is None
    assert len(chunks) >= (5 if batch == 1 else 3)
    seg = int(SEGMENT * SR)
    assert max(c.shape[-1] for c in chunks) <= batch * int(0.75 * seg) + seg
    assert torch.equal(torch.cat(chunks, -1), whole)


def test_streaming_sink_with_a_bag_falls_back_to_one_chunk(short_repo):
    model = separation.load_model("tiny_bag", short_repo, "cpu").model
    mix = _mix(7.0)
    random.seed(3)
    whole = fast_apply.apply_model_batched(model, mix[0], shifts=1, batch_size=2)
    chunks: list[torch.Tensor] = []
    random.seed(3)
    fast_apply.apply_model_batched(model, mix[0], shifts=1, batch_size=2, sink=_collect(chunks))
    assert len(chunks) == 1 and torch.equal(chunks[0], whole)


def test_separate_streams_denormalised_stems_and_can_normalise_in_place(short_repo):
    loaded = separation.load_model("tiny_a", short_repo, "cpu")
    wav = (_mix(8.0)[0].numpy() * 0.5 + 0.01).astype(np.float32)
    random.seed(5)
    stems = separation.separate(loaded, wav.copy(), batch_size=1)
    got: list[np.ndarray] = []
    random.seed(5)
    own = wav.copy()
    assert separation.separate(loaded, own, batch_size=1, inplace=True,
                               sink=lambda start, chunk: got.append(chunk.copy())) is None
    assert not np.array_equal(own, wav)  # normalised in place: no second whole-track copy
    streamed = np.concatenate(got, -1)
    for i, name in enumerate(loaded.sources):
        np.testing.assert_allclose(streamed[i], stems[name], rtol=0, atol=1e-6)


def test_separation_asks_for_its_thread_count_before_every_forward_pass(short_repo):
    """The separation service splits the cores between the separations it runs: each one
    asks before every pass (``threads``), and torch's thread count is set per calling thread."""
    import threading

    loaded = separation.load_model("tiny_a", short_repo, "cpu")
    asked: list[int] = []
    seen: dict[str, list[int]] = {}
    real = separation._set_threads

    def spy(n):
        seen.setdefault(threading.current_thread().name, []).append(n)
        real(n)

    separation._set_threads = spy
    main_threads = torch.get_num_threads()
    answers = iter([2, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    try:
        worker = threading.Thread(name="sep", target=lambda: separation.separate(
            loaded, _mix(7.0)[0].numpy(), batch_size=1,
            threads=lambda: asked.append(1) or next(answers)))
        worker.start()
        worker.join()
    finally:
        separation._set_threads = real
    assert len(asked) >= 3 and seen["sep"][:2] == [2, 1]   # follows the answers, pass by pass
    assert torch.get_num_threads() == main_threads          # other threads keep theirs


def test_service_gives_each_running_separation_its_part_of_the_cores():
    from imaker.separator.service import SeparateRequest, Service, _Separator

    service = Service(concurrency=2)
    service.cores = 4
    sep = _Separator(service, SeparateRequest(job_id="x", source="/s", stems_dir="/d"),
                     threading_event())
    for active, threads in ((1, 4), (2, 2), (3, 1), (5, 1)):
        service.active = active
        assert sep.threads() == threads
    sep.cancel.set()   # the client went away: the next pass stops the separation
    with pytest.raises(Exception, match="client went away"):
        sep.threads()


def threading_event():
    import threading

    return threading.Event()


def test_window_batcher_runs_concurrent_separations_in_shared_passes(short_repo):
    """What the separation service does on CUDA, checked on the CPU: two separations at
    once share forward passes through one WindowBatcher, and each gets what it gets alone."""
    import threading

    model = separation.load_model("tiny_a", short_repo, "cpu").model
    mixes = [_mix(15.0)[0], _mix(12.0, seed=1)[0] * 0.5]
    alone = [fast_apply.apply_model_batched(model, m, shifts=0, batch_size=1) for m in mixes]
    batcher = fast_apply.WindowBatcher(max_items=4, gather_s=0.2)
    slow = threading.Barrier(2)
    together: list = [None, None]

    def run(i):
        slow.wait()
        together[i] = fast_apply.apply_model_batched(model, mixes[i], shifts=0, batch_size=1,
                                                     batcher=batcher)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert batcher.merged >= 1, (batcher.passes, batcher.merged)   # windows of both in one pass
    # what the service's CUDA admission reads: one call's windows (batch 1 of float32
    # stereo windows here); the pass peak is measured on CUDA only, so nothing re-admits on
    # the CPU
    assert batcher.windows_per_call == 1
    assert batcher.input_bytes_per_window > 0 and batcher.input_bytes_per_window % 8 == 0
    assert batcher.pass_bytes_per_window == 0 and batcher.device_free is None
    for got, ref in zip(together, alone):
        assert got.shape == ref.shape
        assert min(_snr_db(ref[None], got[None])) > 80
