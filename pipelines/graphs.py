"""Whole-UNet CUDA graphs: recorded once per (UNet, batch shape) during the warm-up, replayed by requests.

Why not ``torch.compile(mode="reduce-overhead")`` on the whole UNet, as before: that needs dynamo to
trace the whole UNet once per input shape (21 s per graph on a CPU, every start), so 6 sizes x 4
buckets x 2 timestep dtypes took the warm-up past a quarter of an hour. Here the UNet's repeated
transformer blocks are compiled regionally (``optimize.py``: a few small graphs shared by every
variant and size), and this module records the whole forward pass of a UNet, compiled regions and
eager glue alike, into one CUDA graph per (UNet, batch shape): recording runs the UNet once more, it
traces nothing, and a replay launches a step's thousands of kernels as one.

All graphs draw their intermediate memory from one shared pool (graphs never run at once: one GPU
thread), and each replay's output is cloned before any other graph can run, so no graph ever reads
memory another one wrote. Static inputs are shared by every UNet of the same batch shape.

A graph is recorded only while :attr:`UNetGraphs.recording` is on (the warm-up); a request with a
shape that has no graph yet runs the UNet directly, so a request never records (nor compiles). The
recording itself is behind :class:`GraphBackend`: CUDA graphs on a GPU; tests on the CPU replace it
with a backend that runs the same captured function on the same static buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

# (sample, timestep as a 0-d float32 tensor, prompt embeds, pooled embeds, time ids) -> noise prediction
UNetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# What the denoising loop calls: the same, with the timestep as a Python float.
UNetCall = Callable[[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unet_forward(unet: Any) -> UNetForward:
    """The plain forward pass of ``unet`` with the engine's arguments."""

    def forward(sample, timestep, embeds, pooled, time_ids):
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(sample, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    return forward


def plain_call(unet: Any) -> UNetCall:
    """Call ``unet`` directly. The timestep becomes a float32 0-d tensor for every scheduler (Euler's are
    float32, TCD's and LCM's int64 in diffusers), so every variant shares the compiled graphs."""
    forward = unet_forward(unet)

    def call(sample, timestep: float, embeds, pooled, time_ids):
        t = torch.full((), timestep, dtype=torch.float32, device=sample.device)
        return forward(sample, t, embeds, pooled, time_ids)

    return call


class GraphBackend(Protocol):
    """Records ``fn()`` (reading and writing only static tensors) and returns (replay, output)."""

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]: ...


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` with one memory pool shared by every graph it records."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        # Run twice on a side stream first (cuBLAS/cuDNN workspaces, lazy init, autotuning), as torch's
        # CUDA graph notes require, then record on the same kind of stream.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, output


@dataclass
class _Static:
    """Input buffers for one batch shape, shared by every UNet recorded at that shape."""

    sample: torch.Tensor
    timestep: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    @classmethod
    def like(cls, sample, embeds, pooled, time_ids) -> _Static:
        timestep = torch.zeros((), dtype=torch.float32, device=sample.device)
        sample, embeds, pooled, time_ids = (torch.empty_like(x) for x in (sample, embeds, pooled, time_ids))
        return cls(sample, timestep, embeds, pooled, time_ids)

    def fill(self, sample, timestep: float, embeds, pooled, time_ids) -> None:
        """Device-to-device copies and a fill: nothing here waits for the GPU."""
        self.sample.copy_(sample)
        self.timestep.fill_(timestep)
        self.embeds.copy_(embeds)
        self.pooled.copy_(pooled)
        self.time_ids.copy_(time_ids)


def _shape_key(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.stride()) for t in tensors)


class UNetGraphs:
    """The engine's UNet graphs (one instance per engine; see the module docstring)."""

    def __init__(self, backend: GraphBackend | None) -> None:
        self.backend = backend
        self.recording = False
        self._static: dict[tuple, _Static] = {}
        self._graphs: dict[tuple, tuple[Callable[[], None], torch.Tensor]] = {}
        self._failed: set[tuple] = set()
        self.replays = 0

    @classmethod
    def for_device(cls, device: torch.device, enabled: bool) -> UNetGraphs:
        return cls(CudaGraphBackend(device) if enabled and device.type == "cuda" else None)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def __len__(self) -> int:
        return len(self._graphs)

    @contextmanager
    def recording_allowed(self):
        """The warm-up's context: shapes met inside are recorded."""
        saved, self.recording = self.recording, True
        try:
            yield
        finally:
            self.recording = saved

    def caller(self, unet: Any) -> UNetCall:
        """A UNet call for the denoising loop: replays ``unet``'s graph for the input's shape when there is one."""
        forward, direct = unet_forward(unet), plain_call(unet)

        def call(sample, timestep: float, embeds, pooled, time_ids):
            shape = _shape_key(sample, embeds, pooled, time_ids)
            key = (id(unet), shape)
            graph = self._graphs.get(key)
            if graph is None and self.recording and self.backend is not None and key not in self._failed:
                graph = self._record(key, shape, forward, sample, timestep, embeds, pooled, time_ids)
            elif graph is not None:
                self._static[shape].fill(sample, timestep, embeds, pooled, time_ids)
            if graph is None:
                return direct(sample, timestep, embeds, pooled, time_ids)
            replay, output = graph
            replay()
            self.replays += 1
            return output.clone()  # before any other graph can overwrite the shared pool

        return call

    def _record(self, key, shape, forward: UNetForward, sample, timestep: float, embeds, pooled, time_ids):
        """Record ``forward`` on the shape's static inputs, filled with this call's values (the recording's
        warm-up runs see real numbers, and the replay that follows needs no second fill)."""
        static = self._static.get(shape)
        if static is None:
            static = self._static[shape] = _Static.like(sample, embeds, pooled, time_ids)
        static.fill(sample, timestep, embeds, pooled, time_ids)
        assert self.backend is not None
        try:
            graph = self.backend.record(
                lambda: forward(static.sample, static.timestep, static.embeds, static.pooled, static.time_ids)
            )
        except Exception as exc:  # never fatal: this shape runs without a graph
            self._failed.add(key)
            log.warning("could not record a CUDA graph for a UNet batch of %s: %s", tuple(sample.shape), exc)
            return None
        self._graphs[key] = graph
        log.info("recorded a UNet CUDA graph for a batch of %s (%d graphs)", tuple(sample.shape), len(self._graphs))
        return graph
