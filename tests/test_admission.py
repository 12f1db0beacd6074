"""The separation service's CUDA admission (``imaker.separator.admission``): separations
admitted by a device-memory budget, with the window sizes of the full-size models. The
per-window pass figure is what full-size HTDemucs (7.8 s windows, fp32) peaked at on the CPU
here (ru_maxrss with 1, 2 and 4 windows: +521 and +553 MiB per window); on CUDA the
batcher measures its own passes. No GPU here: the service's wiring is checked with the
figures a measured pass leaves in a real ``WindowBatcher``."""

from __future__ import annotations

import anyio
import pytest

from imaker.fast_apply import WindowBatcher
from imaker.separator import admission
from imaker.separator.admission import Footprint

GIB, MIB = 2**30, 2**20
HTDEMUCS_WINDOW = 343980            # 39/5 s at 44.1 kHz (the released htdemucs models)
ROFORMER_CHUNK = 352800             # 8 s at 44.1 kHz (BS-RoFormer's usual chunk_size)
HTDEMUCS = Footprint(pass_bytes_per_window=553 * MIB,
                     input_bytes_per_window=4 * 2 * HTDEMUCS_WINDOW,  # float32 stereo
                     windows_per_call=8)                               # CUDA batch default


def test_full_size_htdemucs_on_an_h200_admits_dozens_not_two():
    # H200: 143771 MiB; about 140 GiB free once the model is loaded
    budget = admission.budget(140 * GIB)
    assert budget == int(0.8 * 140 * GIB)
    assert HTDEMUCS.per_separation == 8 * (553 * MIB + 2751840)    # 4.35 GiB
    n = admission.admitted(budget, HTDEMUCS)
    assert n == 25
    assert admission.windows_per_pass(n, HTDEMUCS, 16) == 200     # one batch of each
    # what they hold at most stays inside the budget
    assert n * HTDEMUCS.per_separation <= budget


@pytest.mark.parametrize("free_gib, expected", [(22, 4), (10, 1), (3, 1), (2000, 32)])
def test_smaller_and_bigger_devices(free_gib, expected):
    """A 24 GB card (about 22 GiB free): 4; 10 GiB: 1; a card where not even one
    separation's batch fits the budget still runs one (what it ran before, batch 8, and
    what the user can lower with DEMUCS_BATCH_SIZE); never more than the cap."""
    assert admission.admitted(admission.budget(free_gib * GIB), HTDEMUCS) == expected


def test_smaller_batches_or_windows_admit_more():
    batch4 = Footprint(553 * MIB, 4 * 2 * HTDEMUCS_WINDOW, 4)
    assert admission.admitted(admission.budget(22 * GIB), batch4) == 8
    # a RoFormer chunk's input is a little larger; its pass figure is whatever is measured
    roformer = Footprint(2 * GIB, 4 * 2 * ROFORMER_CHUNK, 4)
    assert roformer.per_separation == 4 * (2 * GIB + 2822400)
    assert admission.admitted(admission.budget(140 * GIB), roformer) == 13


def test_unmeasured_admits_two_and_cached_memory_counts():
    assert admission.admitted(10**12, None) == admission.UNMEASURED == 2
    assert admission.windows_per_pass(2, None, 16) == 16
    # what PyTorch's allocator holds unused is free for this process
    assert admission.budget(10 * GIB, 2 * GIB) == int(0.8 * 12 * GIB)
    with pytest.raises(ValueError):
        admission.budget(GIB, fraction=0)


def test_service_readmits_from_what_its_batchers_measured(monkeypatch):
    """The wiring on the CPU: a fixed SEPARATOR_CONCURRENCY is never changed; otherwise the
    figures a CUDA pass leaves in the model's batcher set the limiter (waiting requests
    are admitted when it rises), the passes' size and /health."""
    from imaker.separator.service import Service

    service = Service(concurrency=2, cross_batch=True)
    service.batchers["m"] = _measured_batcher()
    service._readmit()
    assert service.concurrency == 2 and service.gpu is None          # fixed: unchanged

    service = Service(cross_batch=True)
    cores = service.concurrency                                      # the CPU default
    service.batchers["m"] = WindowBatcher(max_items=16)             # nothing measured
    service._readmit()
    assert service.concurrency == cores and service.gpu is None

    service.batchers["m"] = _measured_batcher()

    async def main():
        service.limiter = anyio.CapacityLimiter(2)
        holders = [object() for _ in range(5)]
        for h in holders[:2]:
            await service.limiter.acquire_on_behalf_of(h)
        admitted = []

        async def wait(h):
            await service.limiter.acquire_on_behalf_of(h)
            admitted.append(h)

        async with anyio.create_task_group() as tg:
            for h in holders[2:]:
                tg.start_soon(wait, h)
            await anyio.sleep(0.05)
            assert admitted == []                                    # 2 running, 3 waiting
            service._readmit()                                       # 25 fit now
            await anyio.sleep(0.05)
        assert len(admitted) == 3

    anyio.run(main)
    assert service.concurrency == 25 and service.limiter.total_tokens == 25
    assert service.batchers["m"].max_items == service.pass_windows == 200
    assert service.gpu["admitted"] == 25 and service.gpu["windows_per_pass"] == 200


def _measured_batcher() -> WindowBatcher:
    """A batcher holding what ``WindowBatcher._measured`` records after a CUDA pass of full-size
    HTDemucs with about 140 GiB free (set here: there is no GPU in this test)."""
    b = WindowBatcher(max_items=16)
    b.pass_bytes_per_window = HTDEMUCS.pass_bytes_per_window
    b.input_bytes_per_window = HTDEMUCS.input_bytes_per_window
    b.windows_per_call = 8
    b.device_free = (140 * GIB, 0)
    return b
