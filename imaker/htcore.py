"""HTDemucs split into spectral glue (torch) and a real-valued core network (exportable).

``HTDemucs.forward`` = STFT (complex) -> encoders / cross-transformer / decoders -> mask
(complex) -> iSTFT, plus the time branch. Complex tensors and ``torch.stft`` do not export
to ONNX / OpenVINO, so the middle part is wrapped here as ``HTCore``: a plain module that
takes the padded waveform window and the real CaC spectrogram and returns the frequency
branch's output spectrogram (real, before masking) and the time branch's waveform. The
spectral parts stay in torch (``split_forward``): the STFT is ``HTDemucs``' own code, the
masking + iSTFT ``masked_ispec`` (its arithmetic in fewer passes over memory).

``split_forward(model, mix, core)`` computes what ``model(mix)`` computes (to float32
rounding), with ``core``
being any callable with ``HTCore``'s signature (the module itself, an ONNX Runtime session,
an OpenVINO compiled model...). The forward below mirrors demucs 4.1.0's
``HTDemucs.forward`` (MIT licence) in eval mode.
"""

from __future__ import annotations

import random
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F


def is_htdemucs(model) -> bool:
    from demucs.htdemucs import HTDemucs

    return isinstance(model, HTDemucs)


def training_length(model) -> int:
    return int(model.segment * model.samplerate)


class HTCore(nn.Module):
    """``(mix (B, C, L), mag (B, 2C, Fq, T)) -> (x (B, S, 2C, Fq, T), xt (B, S, C, L))``:
    the normalisations, encoders, cross-transformer and decoders of an ``HTDemucs`` in
    eval mode, with ``L`` the model's training length (``use_train_segment``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mix: torch.Tensor, mag: torch.Tensor):
        from einops import rearrange

        m = self.model
        x = mag
        B, C, Fq, T = x.shape
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (1e-5 + std)
        xt = mix
        meant = xt.mean(dim=(1, 2), keepdim=True)
        stdt = xt.std(dim=(1, 2), keepdim=True)
        xt = (xt - meant) / (1e-5 + stdt)

        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(m.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(m.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = m.tencoder[idx]
                xt = tenc(xt)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    inject = xt
            x = encode(x, inject)
            if idx == 0 and m.freq_emb is not None:
                frs = torch.arange(x.shape[-2], device=x.device)
                emb = m.freq_emb(frs).t()[None, :, :, None].expand_as(x)
                x = x + m.freq_emb_scale * emb
            saved.append(x)
        if m.crosstransformer:
            if m.bottom_channels:
                b, c, f, t = x.shape
                x = rearrange(x, "b c f t-> b c (f t)")
                x = m.channel_upsampler(x)
                x = rearrange(x, "b c (f t)-> b c f t", f=f)
                xt = m.channel_upsampler_t(xt)
            x, xt = m.crosstransformer(x, xt)
            if m.bottom_channels:
                x = rearrange(x, "b c f t-> b c (f t)")
                x = m.channel_downsampler(x)
                x = rearrange(x, "b c (f t)-> b c f t", f=f)
                xt = m.channel_downsampler_t(xt)

        for idx, decode in enumerate(m.decoder):
            skip = saved.pop(-1)
            x, pre = decode(x, skip, lengths.pop(-1))
            offset = m.depth - len(m.tdecoder)
            if idx >= offset:
                tdec = m.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    pre = pre[:, :, 0]
                    xt, _ = tdec(pre, None, length_t)
                else:
                    skip = saved_t.pop(-1)
                    xt, _ = tdec(xt, skip, length_t)

        S = len(m.sources)
        x = x.view(B, S, -1, Fq, T)
        x = x * std[:, None] + mean[:, None]
        xt = xt.view(B, S, -1, mix.shape[-1])
        xt = xt * stdt[:, None] + meant[:, None]
        return x, xt


def check_supported(model) -> None:
    """Raise ``ValueError`` for an HTDemucs this split does not reproduce."""
    if not is_htdemucs(model):
        raise ValueError(f"{type(model).__name__} is not an HTDemucs")
    if not model.cac:
        raise ValueError("HTDemucs with cac=False (Wiener masking) is not supported")
    if not model.use_train_segment:
        raise ValueError("HTDemucs with use_train_segment=False is not supported")
    transformer = getattr(model, "crosstransformer", None)
    if transformer is not None and getattr(transformer, "emb", None) == "sin" \
            and int(getattr(transformer, "sin_random_shift", 0)) > 0:
        raise ValueError("sin_random_shift > 0 draws a random position shift per pass")


def _draw(model) -> None:
    """Draw what ``HTDemucs.forward`` draws from ``random`` (the sin embedding's shift,
    ``randrange(1)``), so a backend keeps the shift offsets of ``apply_model``."""
    transformer = getattr(model, "crosstransformer", None)
    if transformer is not None and getattr(transformer, "emb", None) == "sin":
        random.randrange(int(getattr(transformer, "sin_random_shift", 0)) + 1)


def core_inputs(model, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(padded mix, complex spectrogram z, real magnitude)`` for a window ``mix``."""
    length = training_length(model)
    if mix.shape[-1] < length:
        mix = F.pad(mix, (0, length - mix.shape[-1]))
    elif mix.shape[-1] > length:
        raise ValueError(f"window of {mix.shape[-1]} samples > training length {length}")
    z = model._spec(mix)
    return mix, z, model._magnitude(z)


#: ``masked_ispec``'s (window, envelope) per (n_fft, frames, device)
_WINDOWS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def masked_ispec(model, x: torch.Tensor, length: int) -> torch.Tensor:
    """``model._ispec(model._mask(z, x), length)`` of a CaC ``HTDemucs`` (the frequency
    branch's waveform, ``(B, S, C, length)``) with the same arithmetic in fewer passes.

    Why not demucs' own code: for one window of the released htdemucs its two methods took
    116 ms on 2 threads (0.20 CPU-s; an OpenVINO bf16 window is 0.71 s): ``_mask`` copies
    the spectrogram once to make it complex, ``_ispec`` pads it twice (two more copies of
    44 MB) and ``torch.istft`` spends three quarters of its time around the FFT. Here the
    output is written once into the padded, time-major spectrogram that ``_ispec`` would
    build, then inverse FFT (the same ``torch.fft.irfft``), window, overlap-add in the
    hop-sized blocks of the 75 % overlap and division by the window envelope, as
    ``torch.istft(center=True, normalized=True)`` does: 46 ms (0.08 CPU-s), equal to
    demucs' result within float32 rounding (about 140 dB SNR; tests/test_backends.py).
    Falls back to demucs' methods for any other layout (a frame size that is not a whole
    number of hops, a length beyond the padded window)."""
    hop = model.hop_length
    B, S, C2, Fr, T = x.shape
    n_fft = 2 * Fr  # what _ispec's istft derives from the padded Fr + 1 bins
    C, N, r, frames = C2 // 2, B * S * C2 // 2, n_fft // hop, T + 4
    # istft(center=True) drops n_fft // 2 samples; _ispec then drops its own pad
    start = n_fft // 2 + hop // 2 * 3
    if n_fft % hop or C2 % 2 or start + length > (frames - 1) * hop + n_fft // 2:
        return model._ispec(model._mask(None, x), length)  # not _ispec's layout: theirs
    x = x.float()
    # _mask's complex view (re/im interleaved per channel) padded as _ispec pads it: one
    # frequency bin at the top, two frames at each end
    spec = x.new_zeros(N, frames, Fr + 1, 2)
    spec[:, 2:T + 2, :Fr].copy_(x.reshape(N, 2, Fr, T).permute(0, 3, 2, 1))
    seg = torch.fft.irfft(torch.view_as_complex(spec), n=n_fft, dim=-1)  # (N, frames, n_fft)
    del spec
    key = (n_fft, frames, x.device)
    if key not in _WINDOWS:
        hann = torch.hann_window(n_fft, device=x.device)
        # the envelope: the squared windows overlap-added (what istft divides by)
        envelope, squared = hann.new_zeros(frames + r - 1, hop), (hann * hann).view(r, hop)
        for k in range(r):
            envelope[k:k + frames] += squared[k]
        # normalized=True: the inverse FFT is scaled by sqrt(n_fft)
        _WINDOWS[key] = hann * n_fft ** 0.5, envelope.view(-1)
    window, envelope = _WINDOWS[key]
    seg.mul_(window)
    ola = seg.new_zeros(N, frames + r - 1, hop)
    blocks = seg.view(N, frames, r, hop)
    for k in range(r):
        ola[:, k:k + frames] += blocks[:, :, k]
    out = ola.view(N, -1)[:, start:start + length] / envelope[start:start + length]
    return out.view(B, S, C, length)


def split_forward(model, mix: torch.Tensor,
                  core: tp.Callable[[torch.Tensor, torch.Tensor],
                                    tuple[torch.Tensor, torch.Tensor]],
                  draw: bool = True) -> torch.Tensor:
    """``model(mix)`` in eval mode, with the network part computed by ``core``. ``draw``:
    draw the cross-transformer's ``random`` value here (a core that is not the torch
    module does not)."""
    length = mix.shape[-1]
    padded, z, mag = core_inputs(model, mix)
    if draw:
        _draw(model)
    x, xt = core(padded, mag)
    out = xt + masked_ispec(model, x, padded.shape[-1])
    return out[..., :length] if length < padded.shape[-1] else out
