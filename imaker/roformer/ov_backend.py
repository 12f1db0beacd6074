"""OpenVINO for the RoFormer core (CPU, experimental; no Dagster).

``RoformerNet.core`` (band split, transformers, mask estimators: real-valued, everything
but the STFT and iSTFT) is converted with ``openvino.convert_model`` from the torch module
for one input shape (``batch`` windows of ``frames`` STFT frames) and compiled for the CPU
in fp32 (``INFERENCE_PRECISION_HINT=f32``: OpenVINO would pick bf16 by itself on CPUs that
have it). ``runner(model, ...)`` gives a callable for ``RoformerModel.separate(runner=)``;
inputs of another shape (the last batch, a short track) fall back to torch.

Measured at Kim's Mel-Band size (228 M parameters, docs/roformer.md): 1.35-1.39x our
torch fp32 per window, but the conversion took 370-480 s and ~9 GB of memory on 2 cores;
not wired into anything (a product use would save the converted model once).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch


class _Core(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.core(x)


class OpenVinoCore:
    def __init__(self, net, *, batch: int, frames: int, threads: int = 0,
                 precision: str = "f32"):
        import openvino as ov

        self.net = net
        features = net.features(net.spectrogram(torch.zeros(1, net.audio_channels, 4096))).shape[-1]
        self.shape = (batch, frames, features)
        start = time.perf_counter()
        example = torch.randn(*self.shape) * 0.1
        net.prepare()  # the fused weights exist before tracing: constants of the graph
        with torch.no_grad():
            model = ov.convert_model(_Core(net).eval(), example_input=example)
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.convert_seconds = time.perf_counter() - start
        self.local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape or x.device.type != "cpu":
            return self.net.core(x)
        req = getattr(self.local, "req", None)
        if req is None:
            req = self.local.req = self.compiled.create_infer_request()
        req.start_async({0: np.ascontiguousarray(x.numpy(), dtype=np.float32)},
                        share_inputs=True)
        req.wait()
        return torch.from_numpy(req.get_output_tensor(0).data.copy())


def runner(model, *, batch_size: int = 1, threads: int = 0, precision: str = "f32"):
    """An OpenVINO core for ``model`` (a ``RoformerModel``) at its window length."""
    frames = model.chunk_size // model.config.model["stft_hop_length"] + 1
    return OpenVinoCore(model.net, batch=batch_size, frames=frames, threads=threads,
                        precision=precision)
