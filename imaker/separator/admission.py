"""How many separations the service runs at once on CUDA: as many as fit a device-memory
budget (pure arithmetic, no torch).

What one separation holds on the device (``fast_apply.apply_model_batched`` and
``RoformerModel.separate``): its mix and its full-length output stay on the host; only its
current batch of windows is moved to the device (``batch_size`` windows, e.g. 8 x 2 x 343980
float32 = 22 MB for full-size HTDemucs), waits there for a forward pass, and comes back.
The forward passes are shared (``fast_apply.WindowBatcher``): a pass of ``k`` windows
allocates their concatenated input, the network's activations and the output, about ``k``
times a per-window figure. With ``n`` separations admitted and passes of up to ``n`` calls'
windows (one batch from each), the device holds at most
``n * windows_per_call * (pass_bytes_per_window + input_bytes_per_window)`` besides the
weights. Both figures are measured on the device by the batcher (peak allocated during a
pass, minus what was allocated before it, per window; the size of a caller's windows),
never guessed; until a pass was measured the service admits ``UNMEASURED`` separations.

For scale (tests/test_admission.py): HTDemucs with 7.8 s windows (the benchmarks' 26.9 M
build; the released 41.5 M one, ``devmodel.HTDEMUCS_SIZE``, has a wider transformer and
needs somewhat more) peaks at about
540 MiB per window in fp32 on the CPU (ru_maxrss of 1, 2 and 4 windows), so on an H200
(about 140 GiB free) 0.8 x 140 GiB / (8 x 543 MiB) = 26 separations sharing passes of
208 windows, instead of 2 sharing 16.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the share of the device memory free once the model is loaded (plus what PyTorch's caching
#: allocator holds unused) that separations may take: the rest is headroom for the
#: allocator's fragmentation, cuFFT/cuDNN workspaces not seen in a measured pass, another
#: model loaded later (a RoFormer ensemble) and the other processes on the device
BUDGET_FRACTION = 0.8
#: separations admitted before a pass was measured: 2 sharing passes of 16 windows, the
#: figure that ran on an H200 before (benchmarks/RESULTS.md, issue 11) and fits any GPU
#: that holds the model with batch 8
UNMEASURED = 2
#: never more, whatever the device holds: each admitted separation also holds its decoded
#: track on the host (85 MB for 4 minutes of stereo float32) and one thread, and the run
#: queue (MAX_CONCURRENT_RUNS) rarely sends more at once
MAX_SEPARATIONS = 32


@dataclass(frozen=True)
class Footprint:
    """What a separation's windows cost on the device, as measured by the batcher."""
    pass_bytes_per_window: int   # peak allocated during a pass, per window in it
    input_bytes_per_window: int  # one window as it waits on the device for the pass
    windows_per_call: int        # the largest batch one separation hands over at once

    @property
    def per_separation(self) -> int:
        return self.windows_per_call * (self.pass_bytes_per_window + self.input_bytes_per_window)


def budget(free_bytes: int, cached_bytes: int = 0, fraction: float = BUDGET_FRACTION) -> int:
    """The bytes separations may use: ``fraction`` of the device's free memory
    (``torch.cuda.mem_get_info``) plus what this process's caching allocator reserved but
    does not use (``memory_reserved - memory_allocated``: free for us, not for the driver)."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    return int(fraction * (max(0, free_bytes) + max(0, cached_bytes)))


def admitted(budget_bytes: int, footprint: Footprint | None, *,
             cap: int = MAX_SEPARATIONS) -> int:
    """Separations to run at once: as many whole footprints as fit the budget, at least 1
    (one separation alone is what the device ran before), at most ``cap``;
    ``UNMEASURED`` while nothing was measured."""
    if footprint is None or footprint.per_separation <= 0:
        return min(UNMEASURED, cap)
    return max(1, min(cap, budget_bytes // footprint.per_separation))


def windows_per_pass(separations: int, footprint: Footprint | None, default: int) -> int:
    """The batcher's pass size: one call's windows from every admitted separation (so the
    passes take the windows of all of them), ``default`` while nothing was measured."""
    if footprint is None:
        return default
    return max(1, separations * footprint.windows_per_call)
