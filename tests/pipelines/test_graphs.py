"""pipelines/graphs.py: whole-UNet graphs recorded in the warm-up, replayed by requests (issue 10, section 2).

CUDA graphs need a GPU; here :class:`ReplayBackend` stands in for them with the same contract: the
recorded function reads and writes only its static buffers, and a replay runs it again into the very
output tensor it recorded. The engine's side of it (what is recorded when, which shapes replay,
shared static inputs, outputs cloned before the next replay, a failed recording) is the real code.
``tests/gpu/test_gpu_graphs.py`` runs the same checks with real CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.engine import Engine
from pipelines.graphs import UNetGraphs
from pipelines.optimize import SpeedOptions
from pipelines.types import InpaintRequest
from pipelines.warmup import WarmUnit, run_unit
from tests.helpers import box_mask, noise_image

LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
HYPER = "fal-ai/hyper-sdxl/inpainting"


class ReplayBackend:
    """A CPU stand-in for CUDA graphs: record = run (warm-up runs, then the captured one); replay = run the
    same function on the same static buffers, writing into the recorded output tensor."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.recorded = 0

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        fn()
        output = fn()
        self.recorded += 1
        return (lambda: output.copy_(fn())), output


@pytest.fixture(scope="module")
def graph_engine(spec: Any, resolver: Any) -> Engine:
    speed = SpeedOptions(compile=True, compile_backend="eager")
    return Engine.load(
        spec,
        device="cpu",
        resolver=resolver,
        variants=[(LIGHTNING, 4), (HYPER, 4)],
        safety_checker=False,
        prompt_expansion=False,
        speed=speed,
    )


@pytest.fixture
def backend(graph_engine: Engine) -> Iterator[ReplayBackend]:
    fake = ReplayBackend()
    graph_engine.graphs, graph_engine._callers = UNetGraphs(fake), {}
    yield fake
    graph_engine.graphs, graph_engine._callers = UNetGraphs(None), {}


def _request(app: str, seed: int, size: tuple[int, int] = (64, 48), n: int = 1) -> InpaintRequest:
    return InpaintRequest(
        app_id=app,
        image=noise_image(*size, seed=seed),
        mask=box_mask(*size),
        prompt=f"prompt {seed}",
        steps=4,
        seed=seed,
        num_images=n,
        image_size=size,
        enable_safety_checker=False,
        request_id=f"r{seed}",
    )


def _pixels(result: Any) -> list[np.ndarray]:
    assert result.error is None, result.error
    return [np.asarray(im) for im in result.images]


def test_the_warm_up_records_and_requests_replay_with_the_same_images(graph_engine, engine, backend) -> None:
    for rows in (1, 2):
        run_unit(graph_engine, WarmUnit(LIGHTNING, 4, (64, 48), rows))
    assert backend.recorded == 2 and len(graph_engine.graphs) == 2  # one graph per batch bucket
    before = graph_engine.graphs.replays
    (replayed,) = graph_engine.run([_request(LIGHTNING, 5)])
    assert graph_engine.graphs.replays == before + 4  # every step of the request replayed its graph
    assert backend.recorded == 2  # a request never records
    (plain,) = engine.run([_request(LIGHTNING, 5)])
    assert (
        max(
            int(np.abs(a.astype(int) - b.astype(int)).max())
            for a, b in zip(_pixels(replayed), _pixels(plain), strict=True)
        )
        <= 2
    )


def test_a_shape_without_a_graph_runs_directly_and_records_nothing(graph_engine, backend) -> None:
    run_unit(graph_engine, WarmUnit(LIGHTNING, 4, (64, 48), 1))
    replays, recorded = graph_engine.graphs.replays, backend.recorded
    results = graph_engine.run([_request(LIGHTNING, 6, size=(72, 56)), _request(LIGHTNING, 7, n=3)])
    assert [len(_pixels(r)) for r in results] == [1, 3]  # 72x56 and a batch of 4 rows: never warmed
    assert graph_engine.graphs.replays == replays and backend.recorded == recorded


def test_variants_share_static_inputs_and_never_clobber_each_others_outputs(graph_engine, backend) -> None:
    """Two UNets at one shape: two graphs, one set of input buffers; a result cloned from one graph is not
    changed by the other graph's replays (they share one memory pool on the GPU)."""
    for app in (LIGHTNING, HYPER):
        run_unit(graph_engine, WarmUnit(app, 4, (64, 48), 1))
    assert len(graph_engine.graphs) == 2 and len(graph_engine.graphs._static) == 1
    (first,) = graph_engine.run([_request(LIGHTNING, 8)])
    kept = [p.copy() for p in _pixels(first)]
    graph_engine.run([_request(HYPER, 9)])
    (again,) = graph_engine.run([_request(LIGHTNING, 8)])
    assert all(np.array_equal(a, b) for a, b in zip(kept, _pixels(first), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(kept, _pixels(again), strict=True))


def test_a_failed_recording_is_not_fatal(graph_engine) -> None:
    """A shape whose recording fails runs without a graph (and is not tried again each step)."""
    graphs = UNetGraphs(ReplayBackend(fail=True))
    graph_engine.graphs, graph_engine._callers = graphs, {}
    try:
        run_unit(graph_engine, WarmUnit(LIGHTNING, 4, (64, 48), 1))
        (result,) = graph_engine.run([_request(LIGHTNING, 10)])
    finally:
        graph_engine.graphs, graph_engine._callers = UNetGraphs(None), {}
    assert len(_pixels(result)) == 1
    assert len(graphs) == 0 and len(graphs._failed) == 1 and graphs.replays == 0


def test_graphs_are_on_only_with_cuda_and_compile() -> None:
    cpu = SpeedOptions.for_device("cpu")
    assert not cpu.cuda_graphs and not UNetGraphs.for_device(torch.device("cpu"), True).enabled
    assert SpeedOptions.for_device("cuda").cuda_graphs
    assert not SpeedOptions.for_device("cuda", compile=False).cuda_graphs
