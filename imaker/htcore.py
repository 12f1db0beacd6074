"""HTDemucs split into spectral glue (torch) and a real-valued core network (exportable).

``HTDemucs.forward`` = STFT (complex) -> encoders / cross-transformer / decoders -> mask
(complex) -> iSTFT, plus the time branch. Complex tensors and ``torch.stft`` do not export
to ONNX / OpenVINO, so the middle part is wrapped here as ``HTCore``: a plain module that
takes the padded waveform window and the real CaC spectrogram and returns the frequency
branch's output spectrogram (real, before masking) and the time branch's waveform. The
spectral parts stay in torch (``split_forward``), exactly the code of ``HTDemucs``.

``split_forward(model, mix, core)`` computes what ``model(mix)`` computes, with ``core``
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
    zout = model._mask(z, x)
    out = model._ispec(zout, padded.shape[-1])
    out = xt + out
    return out[..., :length] if length < padded.shape[-1] else out
