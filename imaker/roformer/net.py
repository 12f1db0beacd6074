"""BS-RoFormer and Mel-Band RoFormer networks (torch only, no Dagster).

Written for this project from the papers (Lu et al. 2023, "Music Source Separation with
Band-Split RoPE Transformer"; Wang et al. 2023, "Mel-Band RoFormer") and the layout of the
community checkpoints (ZFTurbo's Music-Source-Separation-Training, which audio-separator
and UVR load): the module tree and parameter names are chosen so that those state dicts
load with ``strict=True``.

The signal path of one window (``b`` items, ``s`` channels, ``n`` stems):

1. STFT of every channel (Hann window, centred); channels are interleaved into the
   frequency axis (``f`` major, ``s`` minor) and real/imaginary parts into the features.
2. Band split: each band's features (BS: consecutive bins ``freqs_per_bands``; Mel: the
   bins under each triangle of a Slaney mel filter bank, overlapping) go through RMSNorm
   and a Linear layer to ``dim`` features: a ``(b, frames, bands, dim)`` grid.
3. ``depth`` axial blocks: [linear-attention transformer over the whole grid,] a
   transformer along time (per band) and one along bands (per frame); attention with
   rotary position embeddings and per-head sigmoid gates, RMSNorm pre-norm, GELU MLP.
4. Per stem, a mask estimator (per band: MLP with tanh, then GLU) gives a complex mask
   per bin (Mel: the estimates of overlapping bands are averaged per bin).
5. Masked spectrogram -> iSTFT.

Everything between the STFT and the iSTFT is real-valued (``RoformerNet.core``), so the
heavy part can be exported to other backends on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import BS_ROFORMER, MEL_BAND_ROFORMER


# ----- fused weights ---------------------------------------------------------------------
# The forward passes below run on weights derived from the loaded parameters (RMSNorm
# gains folded into the following Linear, the query/key/value and gate projections in one
# matrix, the per-band Linear layers stacked for batched matmuls). They are plain
# attributes, not parameters or buffers (the state dict keeps the checkpoint's names and
# shapes), built on first use and rebuilt whenever a parameter changes: the cache key is
# every parameter's storage address and version counter (``load_state_dict``, in-place
# updates under ``no_grad`` and ``.to()`` all change one of them). ``RoformerNet.prepare``
# builds them all at once (``load`` calls it).
def _param_key(params) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class _Fused(nn.Module):
    """A module whose forward uses tensors derived from its parameters (``_build``)."""

    def _derived(self):
        params = self._fused_from()
        key = _param_key(params)
        cache = self.__dict__.get("_fused_cache")
        if cache is None or cache[0] != key or torch.compiler.is_compiling():
            # normal tensors even when first used under inference_mode (the parameters
            # may become views into them; a later in-place update must stay possible)
            with torch.inference_mode(False), torch.no_grad():
                built = self._build()
            if torch.compiler.is_compiling():
                return built
            # the key after building: _build may re-point parameters (MaskEstimator)
            cache = (_param_key(self._fused_from()), built)
            self.__dict__["_fused_cache"] = cache
        return cache[1]

    def _derived_as(self, dtype: torch.dtype | None):
        """``_derived()`` cast to ``dtype`` (autocast's; None: as built), the cast kept
        beside them (autocast would otherwise cast every weight on every window)."""
        base = self._derived()
        if dtype is None:
            return base
        cache = self.__dict__.get("_fused_cast")
        if cache is None or cache[0] is not base or cache[1] != dtype:
            with torch.inference_mode(False), torch.no_grad():
                cache = (base, dtype, _cast(base, dtype))
            if torch.compiler.is_compiling():
                return cache[2]
            self.__dict__["_fused_cast"] = cache
        return cache[2]

    def _fused_from(self) -> list:
        return list(self.parameters())

    def _build(self):  # pragma: no cover - abstract
        raise NotImplementedError


def release_freed_memory() -> None:
    """Hand memory freed while loading back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Why: once a process has freed a large block (any numpy temporary), glibc
    raises its mmap threshold, and tensors freed while loading (the mask estimators'
    per-band checkpoint tensors, replaced by views into their stacks) stay in its heap: at
    Kim's size the service kept 1.94 GB resident after loading instead of 1.26 GB."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _cast(tree, dtype: torch.dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast(t, dtype) for t in tree)
    return tree


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in effect for ``x``'s device, or None."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` over its L2 norm along the last axis (``F.normalize``: norm clamped at 1e-12)."""
    return F.normalize(x, dim=-1)


# ----- building blocks -------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the full head dimension, pairs interleaved
    (``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``), angles ``pos * freqs`` in fp32.
    ``freqs`` is a (non-trainable) parameter because the checkpoints carry it."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _load_from_state_dict(self, *args, **kwargs):  # new freqs: forget cached angles
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def cos_sin(self, n: int, device: torch.device, dtype: torch.dtype):
        key = (n, str(device), dtype, self.freqs.data_ptr())
        hit = self._cache.get(key)
        if hit is None or torch.compiler.is_compiling():
            pos = torch.arange(n, device=device, dtype=torch.float32)
            angles = pos[:, None] * self.freqs.to(device=device, dtype=torch.float32)[None, :]
            angles = angles.repeat_interleave(2, dim=-1)
            hit = (angles.cos().to(dtype), angles.sin().to(dtype))
            if not torch.compiler.is_compiling():
                if len(self._cache) > 8:
                    self._cache.clear()
                self._cache[key] = hit
        return hit

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., n, d)``, positions along ``n``."""
        cos, sin = self.cos_sin(x.shape[-2], x.device, x.dtype)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * cos + rotated * sin

    def cis(self, n: int, device: torch.device) -> torch.Tensor:
        """``(n, d / 2)`` complex64 ``exp(i * pos * freqs)`` (fp32 angles)."""
        key = ("cis", n, str(device), self.freqs.data_ptr(), self.freqs._version)
        hit = self._cache.get(key)
        if hit is None or torch.compiler.is_compiling():
            pos = torch.arange(n, device=device, dtype=torch.float32)
            angles = pos[:, None] * self.freqs.to(device=device, dtype=torch.float32)[None, :]
            hit = torch.polar(torch.ones_like(angles), angles)
            if not torch.compiler.is_compiling():
                if len(self._cache) > 8:
                    self._cache.clear()
                self._cache[key] = hit
        return hit

    def rotate_at(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``rotate`` with positions along axis ``dim`` of ``x`` (``(..., d)``, any layout):
        the pairs ``(x0, x1)`` as complex numbers times ``exp(i * angle)`` — one pass,
        the same arithmetic (``x0 cos - x1 sin``, ``x1 cos + x0 sin``)."""
        dim = dim % x.ndim
        n = x.shape[dim]
        cis = self.cis(n, x.device).view(n, *([1] * (x.ndim - 2 - dim)), -1)
        dtype = x.dtype
        pairs = x.float().unflatten(-1, (-1, 2))
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(
                st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()
        out = torch.view_as_real(torch.view_as_complex(pairs) * cis).flatten(-2)
        return out if dtype == torch.float32 else out.to(dtype)


class Attention(_Fused):
    """Gated multi-head attention with rotary embeddings. ``forward(x)`` returns
    ``x + attention(x)`` (the residual is added in the output projection's matmul)."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary: RotaryEmbedding | None):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.Dropout(0.0))
        self.rotary_embed = rotary

    def _fused_from(self) -> list:
        return [self.norm.gamma, self.to_qkv.weight, self.to_gates.weight, self.to_gates.bias,
                self.to_out[0].weight]

    def _build(self):
        # RMSNorm's gain folded into the input projections; qkv and gates in one matmul
        gain = self.norm.gamma * self.norm.scale
        weight = torch.cat([self.to_qkv.weight, self.to_gates.weight]) * gain
        bias = torch.cat([self.to_gates.bias.new_zeros(self.to_qkv.weight.shape[0]),
                          self.to_gates.bias])
        return weight, bias, self.to_out[0].weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        h, d = self.heads, self.dim_head
        w_in, b_in, w_out = self._derived_as(_autocast_dtype(x))
        y = F.linear(_unit_rows(x), w_in, b_in)                  # (b, n, 3 h d + h)
        qkv = y[..., :3 * h * d].view(b, n, 3, h, d)
        gates = y[..., 3 * h * d:]
        if self.rotary_embed is not None:
            qk = self.rotary_embed.rotate_at(qkv[:, :, :2], dim=1)
            q, k = qk.permute(2, 0, 3, 1, 4)
        else:
            q, k = qkv[:, :, :2].permute(2, 0, 3, 1, 4)
        v = qkv[:, :, 2].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)           # (b, h, n, d)
        gated = torch.empty((b, n, h, d), dtype=out.dtype, device=out.device)
        torch.mul(out.transpose(1, 2), gates.sigmoid().unsqueeze(-1).to(out.dtype), out=gated)
        res = x.reshape(b * n, dim)
        if gated.dtype != res.dtype or w_out.dtype != res.dtype:  # autocast
            return x + F.linear(gated.view(b, n, h * d), w_out.t())
        return torch.addmm(res, gated.view(b * n, h * d), w_out).view(b, n, dim)


class LinearAttention(nn.Module):
    """Cross-covariance ("linear") attention of El-Nouby et al. 2021 (XCiT): attention
    between feature channels, queries and keys L2-normalised along the sequence, a
    learned per-head temperature and a fixed softmax scale of 8."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, inner * 3, bias=False))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Sequential(nn.Identity(), nn.Linear(inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)    # (b, h, d, n)
        q = q * self.temperature.exp()
        out = F.scaled_dot_product_attention(q, k, v, scale=8.0)  # (b, h, d, n)
        return self.to_out(out.permute(0, 3, 1, 2).reshape(b, n, -1))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) + x


class FeedForward(_Fused):
    """RMSNorm, Linear, GELU, Linear. ``forward(x)`` returns ``x + ff(x)``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(inner, dim), nn.Dropout(0.0))

    def _build(self):
        norm, first, last = self.net[0], self.net[1], self.net[4]
        return first.weight * (norm.gamma * norm.scale), first.bias, last.weight.t(), last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self._derived_as(_autocast_dtype(x))
        hidden = F.gelu(F.linear(_unit_rows(x), w1, b1))
        dim = x.shape[-1]
        if hidden.dtype != x.dtype or w2.dtype != x.dtype:  # autocast
            return x + F.linear(hidden, w2.t(), b2)
        out = x + b2
        out.view(-1, dim).addmm_(hidden.view(-1, hidden.shape[-1]), w2)
        return out


class Transformer(nn.Module):
    def __init__(self, *, dim: int, depth: int, heads: int, dim_head: int, norm_output: bool,
                 rotary: RotaryEmbedding | None = None, linear: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn = (LinearAttention(dim, heads, dim_head) if linear
                    else Attention(dim, heads, dim_head, rotary))
            self.layers.append(nn.ModuleList([attn, FeedForward(dim)]))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:  # each adds its residual
            x = attn.residual(x) if isinstance(attn, LinearAttention) else attn(x)
            x = ff(x)
        return self.norm(x)


def _runs(sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(first band, bands, size)`` of each run of consecutive bands of one size."""
    runs: list[tuple[int, int, int]] = []
    for i, size in enumerate(sizes):
        if runs and runs[-1][2] == size:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, size)
        else:
            runs.append((i, 1, size))
    return runs


class BandSplit(_Fused):
    """Per band RMSNorm and Linear to ``dim`` features; bands of equal width run as one
    batched matmul (the norm's gain folded into the weights)."""

    def __init__(self, dim: int, dim_inputs: tuple[int, ...]):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        self.to_features = nn.ModuleList(
            nn.Sequential(RMSNorm(d), nn.Linear(d, dim)) for d in self.dim_inputs)

    def _build(self):
        built = []
        for first, count, size in _runs(self.dim_inputs):
            nets = self.to_features[first:first + count]
            weight = torch.stack([n[1].weight.t() * (n[0].gamma * n[0].scale)[:, None]
                                  for n in nets])                # (bands, size, dim)
            bias = torch.stack([n[1].bias for n in nets])[:, None]  # (bands, 1, dim)
            built.append((first, count, size, weight, bias))
        return built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, features = x.shape
        rows = x.reshape(-1, features)
        out = None
        offset = 0
        for first, count, size, weight, bias in self._derived():
            part = _unit_rows(rows[:, offset:offset + count * size].unflatten(-1, (count, size)))
            y = torch.baddbmm(bias.to(part.dtype), part.transpose(0, 1), weight.to(part.dtype))
            if out is None:
                out = y.new_empty(rows.shape[0], len(self.dim_inputs), y.shape[-1])
            out[:, first:first + count] = y.transpose(0, 1)
            offset += count * size
        return out.view(*lead, len(self.dim_inputs), -1)


def _mlp(dim_in: int, dim_out: int, dim_hidden: int, hidden_layers: int) -> nn.Sequential:
    dims = (dim_in, *((dim_hidden,) * hidden_layers), dim_out)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(_Fused):
    """Per band: an MLP (Linear, tanh, ..., Linear) to twice the band's features, then a
    GLU. ``hidden_layers``: BS-RoFormer's ``mask_estimator_depth`` counts the Linear
    layers (depth - 1 hidden layers), Mel-Band RoFormer's counts the hidden layers."""

    def __init__(self, dim: int, dim_inputs: tuple[int, ...], hidden_layers: int,
                 expansion: int):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        self.to_freqs = nn.ModuleList(
            nn.Sequential(_mlp(dim, d * 2, dim * expansion, hidden_layers), nn.GLU(dim=-1))
            for d in self.dim_inputs)

    # bands per batched matmul: at most this many hidden activations at once
    CHUNK_ELEMENTS = 1 << 24

    def _build(self):
        mlps = [net[0] for net in self.to_freqs]
        linears = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in mlps]

        def stacked(layers: list[nn.Linear]):
            # one (bands, out, in) tensor; each band's parameters become views into it
            # (no second copy of the weights: ~90 % of a Mel-Band model's parameters are
            # here), so load_state_dict and in-place updates write into the stack itself
            # Filled band by band, each band's own tensors released as it is re-pointed:
            # loading holds one band's weights twice, not the whole stack (~0.6 GB at Kim's
            # size)
            first = layers[0]
            weight = first.weight.new_empty((len(layers), *first.weight.shape))
            bias = first.bias.new_empty((len(layers), *first.bias.shape))
            released = 0
            for k, lin in enumerate(layers):
                weight[k].copy_(lin.weight)
                bias[k].copy_(lin.bias)
                released += lin.weight.nbytes + lin.bias.nbytes
                lin.weight.data = weight[k]
                lin.bias.data = bias[k]
                if released >= 64 << 20:
                    release_freed_memory()
                    released = 0
            return weight.transpose(1, 2), bias[:, None]      # (bands, in, out), (bands, 1, out)

        hidden = [stacked([ls[i] for ls in linears]) for i in range(len(linears[0]) - 1)]
        last = [(first, count, *stacked([ls[-1] for ls in linears[first:first + count]]))
                for first, count, _ in _runs(self.dim_inputs)]
        return hidden, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., bands, dim)`` -> ``(..., sum of dim_inputs)``: per band the MLP and GLU,
        bands batched (``CHUNK_ELEMENTS`` bounds the hidden activations held at once)."""
        hidden, last = self._derived_as(_autocast_dtype(x))
        *lead, bands, dim = x.shape
        rows = x.reshape(-1, bands, dim)
        n = rows.shape[0]
        width = hidden[0][0].shape[-1] if hidden else dim
        step = max(1, self.CHUNK_ELEMENTS // max(1, n * width))
        outs: list[torch.Tensor] = []
        for lo in range(0, bands, step):
            hi = min(bands, lo + step)
            h = rows[:, lo:hi].transpose(0, 1)                  # (bands, rows, dim)
            for weight, bias in hidden:
                h = torch.baddbmm(bias[lo:hi], h, weight[lo:hi])
                h = h.tanh_() if not h.requires_grad else h.tanh()
            for first, count, weight, bias in last:
                a, b = max(first, lo), min(first + count, hi)
                if a >= b:
                    continue
                y = torch.baddbmm(bias[a - first:b - first], h[a - lo:b - lo],
                                  weight[a - first:b - first])
                y = F.glu(y, dim=-1)                            # (bands, rows, size)
                outs.append(y.transpose(0, 1).reshape(n, -1))
        return torch.cat(outs, dim=-1).view(*lead, -1)


# ----- mel bands -------------------------------------------------------------------------
def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (linear below 1 kHz, logarithmic above), as librosa computes it."""
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = hz >= min_log_hz
    mels[log_t] = min_log_mel + np.log(hz[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def mel_band_membership(sample_rate: int, n_fft: int, num_bands: int) -> np.ndarray:
    """``(num_bands, n_fft // 2 + 1)`` bools: which STFT bins each mel band covers — the
    non-zero entries of the Slaney mel filter bank (``librosa.filters.mel(sr=, n_fft=,
    n_mels=)`` with its defaults: 0 Hz to Nyquist, Slaney scale and norm), computed the
    same way in float64, with the first bin of the first band and the last bin of the
    last band forced on (as the checkpoints were trained)."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    lo, hi = _hz_to_mel(np.array([0.0])), _hz_to_mel(np.array([float(sample_rate) / 2]))
    mel_f = _mel_to_hz(np.linspace(lo[0], hi[0], num_bands + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    member = np.zeros((num_bands, len(fftfreqs)), dtype=bool)
    for i in range(num_bands):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weight = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
        member[i] = weight > 0
    member[0, 0] = True
    member[-1, -1] = True
    return member


# ----- the networks ----------------------------------------------------------------------
class RoformerNet(nn.Module):
    """BS-RoFormer (``architecture="bs_roformer"``, ``freqs_per_bands``) or Mel-Band
    RoFormer (``"mel_band_roformer"``, ``num_bands``); keyword arguments as in the
    ``model`` section of a config (``imaker.roformer.config`` fills in the defaults).

    ``forward(audio)``: ``(batch, channels, samples)`` -> ``(batch, stems, channels, m)``
    with ``m = hop * (samples // hop)`` (the iSTFT's own length, as the reference
    implementation returns it) unless ``match_input_audio_length``."""

    def __init__(self, architecture: str, *, dim: int, depth: int, stereo: bool = False,
                 num_stems: int = 1, time_transformer_depth: int = 2,
                 freq_transformer_depth: int = 2, linear_transformer_depth: int = 0,
                 dim_head: int = 64, heads: int = 8, flash_attn: bool = True,
                 stft_n_fft: int = 2048, stft_hop_length: int = 512, stft_win_length: int = 2048,
                 stft_normalized: bool = False, mask_estimator_depth: int = 2,
                 mlp_expansion_factor: int = 4, skip_connection: bool = False,
                 freqs_per_bands: tuple[int, ...] | None = None, num_bands: int | None = None,
                 sample_rate: int = 44100, match_input_audio_length: bool = False,
                 **_ignored: Any):
        super().__init__()
        if architecture not in (BS_ROFORMER, MEL_BAND_ROFORMER):
            raise ValueError(f"unknown RoFormer architecture {architecture!r}")
        self.architecture = architecture
        self.mel = architecture == MEL_BAND_ROFORMER
        self.audio_channels = 2 if stereo else 1
        self.num_stems = num_stems
        self.skip_connection = skip_connection
        self.n_fft, self.hop, self.win = stft_n_fft, stft_hop_length, stft_win_length
        self.stft_normalized = stft_normalized
        self.match_input_audio_length = match_input_audio_length and self.mel
        # the buffers are computed, not loaded: on the CPU even when the parameters are
        # built on the meta device (``model.load``: no random init, the checkpoint's
        # tensors become the parameters)
        with torch.device("cpu"):
            self.register_buffer("window", torch.hann_window(stft_win_length), persistent=False)
        n_freqs = stft_n_fft // 2 + 1
        s = self.audio_channels

        kwargs = dict(dim=dim, heads=heads, dim_head=dim_head,
                      norm_output=self.mel)  # BS: one final norm instead
        time_rotary, freq_rotary = RotaryEmbedding(dim_head), RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = []
            if linear_transformer_depth > 0:
                block.append(Transformer(depth=linear_transformer_depth, linear=True, **kwargs))
            block.append(Transformer(depth=time_transformer_depth, rotary=time_rotary, **kwargs))
            block.append(Transformer(depth=freq_transformer_depth, rotary=freq_rotary, **kwargs))
            self.layers.append(nn.ModuleList(block))
        if not self.mel:
            self.final_norm = RMSNorm(dim)

        if self.mel:
            with torch.device("cpu"):
                member = torch.from_numpy(mel_band_membership(sample_rate, stft_n_fft, num_bands))
                if not bool(member.any(dim=0).all()):
                    raise ValueError(f"num_bands={num_bands} with stft_n_fft={stft_n_fft} "
                                     "leaves STFT bins outside every mel band")
                bins = torch.arange(n_freqs).expand(num_bands, n_freqs)[member]  # band-major
                index = (bins[:, None] * s + torch.arange(s)).reshape(-1)        # (f s) layout
                per_band = member.sum(dim=1).tolist()
                bands_per_bin = member.sum(dim=0).to(torch.float32)
                self.register_buffer("freq_indices", index, persistent=False)
                self.register_buffer("bands_per_bin", bands_per_bin.repeat_interleave(s),
                                     persistent=False)
        else:
            per_band = list(freqs_per_bands)
            if sum(per_band) != n_freqs:
                raise ValueError(f"freqs_per_bands sums to {sum(per_band)}, expected {n_freqs}")
        dim_inputs = tuple(2 * f * s for f in per_band)
        self.band_split = BandSplit(dim, dim_inputs)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, dim_inputs,
                          mask_estimator_depth if self.mel else mask_estimator_depth - 1,
                          mlp_expansion_factor)
            for _ in range(num_stems))

    def prepare(self) -> "RoformerNet":
        """Build the fused weights now (they are otherwise built on first use and rebuilt
        when a parameter changes)."""
        for module in self.modules():
            if isinstance(module, _Fused):
                module._derived()
        return self

    # -- spectral front and back ends (fp32, complex) --
    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """``(b, s, t)`` -> ``(b, f * s, frames, 2)`` (bins major, channels minor)."""
        b, s, t = audio.shape
        spec = torch.stft(audio.reshape(b * s, t).float(), self.n_fft, self.hop, self.win,
                          window=self.window, normalized=self.stft_normalized,
                          return_complex=True)
        spec = torch.view_as_real(spec)                          # (b s, f, frames, 2)
        f, frames = spec.shape[1], spec.shape[2]
        return spec.view(b, s, f, frames, 2).transpose(1, 2).reshape(b, f * s, frames, 2)

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        """The network's input: ``(b, frames, features)`` from ``spectrogram``."""
        if self.mel:
            spec = spec.index_select(1, self.freq_indices)
        b, fs, frames, _ = spec.shape
        return spec.transpose(1, 2).reshape(b, frames, fs * 2)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """Band split, transformers and mask estimators: ``(b, frames, features)`` ->
        ``(b, stems, frames, features)`` (the real-valued masks of the bins in ``x``)."""
        if torch.is_autocast_enabled(x.device.type):
            # under autocast the band split stays fp32: rounding the spectrogram features
            # to bf16 is most of bf16's error (BS-RoFormer ep_317 size: 37.5 dB against
            # fp32 with it in bf16, 43 dB without; it is ~1 % of the FLOPs)
            with torch.autocast(x.device.type, enabled=False):
                x = self.band_split(x.float())
        else:
            x = self.band_split(x)                               # (b, t, bands, d)
        b, t, f, d = x.shape
        stored: list[torch.Tensor] = []
        for block in self.layers:
            if len(block) == 3:
                linear, time_tf, freq_tf = block
                x = linear(x.reshape(b, t * f, d)).view(b, t, f, d)
            else:
                time_tf, freq_tf = block
            if self.skip_connection:
                for previous in stored:
                    x = x + previous
            x = x.transpose(1, 2).reshape(b * f, t, d)
            x = time_tf(x)
            x = x.view(b, f, t, d).transpose(1, 2).reshape(b * t, f, d)
            x = freq_tf(x)
            x = x.view(b, t, f, d)
            if self.skip_connection:
                stored.append(x)
        if not self.mel:
            x = self.final_norm(x)
        return torch.stack([est(x) for est in self.mask_estimators], dim=1)

    def apply_masks(self, spec: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked spectrogram ``(b, stems, f * s, frames, 2)``."""
        b, n, frames, _ = masks.shape
        masks = masks.view(b, n, frames, -1, 2).transpose(2, 3)  # (b, n, bins, t, 2)
        if self.mel:
            summed = masks.new_zeros(b, n, spec.shape[1], frames, 2)
            summed.index_add_(2, self.freq_indices, masks)
            masks = summed / self.bands_per_bin.clamp(min=1e-8)[:, None, None]
        sr, si = spec[:, None, ..., 0], spec[:, None, ..., 1]
        mr, mi = masks[..., 0], masks[..., 1]
        return torch.stack((sr * mr - si * mi, sr * mi + si * mr), dim=-1)

    def waveform(self, masked: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """``(b, n, f * s, frames, 2)`` -> ``(b, n, s, samples)``."""
        b, n, fs, frames, _ = masked.shape
        s = self.audio_channels
        spec = masked.view(b, n, fs // s, s, frames, 2).transpose(2, 3)
        spec = torch.view_as_complex(spec.reshape(b * n * s, fs // s, frames, 2).contiguous())
        audio = torch.istft(spec, self.n_fft, self.hop, self.win, window=self.window,
                            normalized=self.stft_normalized, length=length)
        return audio.view(b, n, s, -1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.ndim != 3 or audio.shape[1] != self.audio_channels:
            raise ValueError(f"expected (batch, {self.audio_channels}, samples), "
                             f"got {tuple(audio.shape)}")
        spec = self.spectrogram(audio)
        masks = self.core(self.features(spec)).float()
        length = audio.shape[-1] if self.match_input_audio_length else None
        return self.waveform(self.apply_masks(spec, masks), length)


def parameter_count(net: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in net.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total

