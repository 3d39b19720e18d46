"""scripts/bench.py: a whole --tiny run on CPU (every section, row and check), and an equivalence check
that fails when the engine computes something else (other weights, other seed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.live import REPO

sys.path.insert(0, str(REPO / "scripts"))

import bench_measure
import bench_models

STEPS = (1, 2, 4, 8)
BATCHES = (1, 2)
CLIENTS = (1, 3)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> bench_models.ModelSet:
    """The tiny random-weight model folder, written once for this module."""
    root = tmp_path_factory.mktemp("bench") / "models"
    return bench_models.ensure_model_set(root, bench_models.architecture("tiny"), 0, CPU)


def test_tiny_run_measures_every_row_and_passes_the_equivalence_check(
    tiny_models: bench_models.ModelSet, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/bench.py", "--tiny", "--device", "cpu", "--models-dir", str(tiny_models.root)]
    command += ["--json", str(out), "--steps", ",".join(map(str, STEPS)), "--resolution", "64x48"]
    command += ["--batch-sizes", ",".join(map(str, BATCHES)), "--clients", ",".join(map(str, CLIENTS))]
    command += ["--iterations", "1", "--warmup", "0", "--requests-per-client", "1", "--server-requests", "1"]
    command += ["--matmul-size", "256", "--sections", "naive,eager,engine,server,equivalence"]
    # One torch thread per process (the script and its server child), as tests/live.py does for servers:
    # on a small machine shared with other work, more threads slow everything down many times over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "p50 ms" in run.stdout and "equivalence (engine vs naive, same weights and seed): passed" in run.stdout

    report = json.loads(out.read_text())
    wanted = {("naive", n, 1, None) for n in STEPS}
    wanted |= {(section, n, b, None) for section in ("eager", "engine") for n in STEPS for b in BATCHES}
    wanted |= {("server", n, 1, c) for n in STEPS for c in CLIENTS}
    rows = {(r["section"], r["steps"], r["batch"], r["clients"]): r for r in report["rows"]}
    assert set(rows) == wanted and len(report["rows"]) == len(wanted)
    for key, row in rows.items():
        for name in ("p50_ms", "p99_ms", "images_per_s"):
            assert isinstance(row[name], float) and math.isfinite(row[name]) and row[name] > 0, (key, name, row)
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["floor_share"] is None  # a CPU's matmul rate is no peak: n/a, not a made-up share
        section, _, batch, clients = key
        expected_images = batch if section != "server" else clients
        assert row["images"] == expected_images, (key, row)

    equivalence = report["equivalence"]
    assert equivalence["ran"] and equivalence["passed"] is True
    assert [c["steps"] for c in equivalence["checks"]] == list(STEPS)
    assert all(c["passed"] and c["within_tolerance"] and c["tolerance_discriminates"] for c in equivalence["checks"])

    assert [e["label"] for e in report["engines"]] == ["eager", "engine"]
    assert all(e["load_s"] > 0 and e["warmup_s"] >= 0 for e in report["engines"])

    server_rows = [r for r in report["rows"] if r["section"] == "server"]
    assert all(r["status_reads_per_request"] >= 1 and "inference" in r["server_timings_mean_ms"] for r in server_rows)
    # Tiny models at 48x64: the floor is counted from the models, not taken from perf-anchors.md.
    assert report["floor"]["source"].startswith("counted")
    assert set(report["floor"]["tflop_per_image"]) == {str(n) for n in STEPS}
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] and env["device"] == "cpu"
    assert report["settings"]["steps"] == list(STEPS) and report["matmul"]["tflops"] > 0


def test_lever_sweep_and_ready_sections(tiny_models: bench_models.ModelSet, tmp_path: Path) -> None:
    """``levers``: one engine row set per cumulative lever set (compile included: Inductor on CPU; no CUDA
    graphs nor cuDNN/FP8 rows without CUDA);
    ``ready``: the real ``serve`` started twice, time to ready and the first request vs the steady state."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/bench.py", "--tiny", "--device", "cpu", "--models-dir", str(tiny_models.root)]
    command += ["--json", str(out), "--steps", "1", "--resolution", "64x48", "--sections", "levers,ready"]
    command += ["--batch-sizes", "1", "--iterations", "2", "--warmup", "1", "--matmul-size", "256"]
    command += ["--compile-backend", "eager"]  # the sweep's logic; Inductor's C++ on this CPU would take minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["section"] for r in rows] == [
        "levers:none",
        "levers:fuse_qkv",
        "levers:fuse_qkv+channels_last",
        "levers:fuse_qkv+channels_last+compile",
        "ready:first start",
        "ready:restart",
    ]
    assert [r["speed"] for r in rows[:4]] == [r["section"].split(":", 1)[1] for r in rows[:4]]
    for row in rows[4:]:
        assert row["ready_s"] > 0 and row["first_request_ms"] > 0 and row["first_vs_steady"] > 0
        assert row["requests"] == 2 and row["images"] == 3  # the first request, then --iterations more


@pytest.mark.parametrize(
    ("text", "levers"),
    [
        ("none", (False, False, False, False)),
        ("fuse_qkv", (True, False, False, False)),
        ("compile, fuse_qkv", (True, False, True, False)),
        ("fuse_qkv,channels_last,compile", (True, True, True, False)),
        ("fuse_qkv,channels_last,compile,cuda_graphs", (True, True, True, True)),
    ],
)
def test_speed_option_parsing(text: str, levers: tuple[bool, bool, bool, bool]) -> None:
    options = bench_models.speed_options(text, CPU, None)
    assert (options.fuse_qkv, options.channels_last, options.compile, options.cuda_graphs) == levers
    assert bench_models.speed_options("auto", CPU, None) == bench_models.speed_options("none", CPU, None)
    extra = bench_models.speed_options("compile,cudnn_attention,fp8", CPU, None)
    assert extra.attention == "cudnn" and extra.fp8 and bench_models.speed_label(extra) == "compile+cudnn_attention+fp8"


def test_unknown_or_impossible_levers_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown lever"):
        bench_models.speed_options("fuse_qkv,turbo", CPU, None)
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        bench_models.speed_options("cuda_graphs", CPU, None)


def test_lever_sets_add_one_lever_at_a_time() -> None:
    import bench

    assert bench.lever_sets(CPU) == ["none", "fuse_qkv", "fuse_qkv,channels_last", "fuse_qkv,channels_last,compile"]
    cuda = bench.lever_sets(torch.device("cuda"))
    assert cuda[-3:] == [
        "fuse_qkv,channels_last,compile,cuda_graphs",
        "fuse_qkv,channels_last,compile,cuda_graphs,cudnn_attention",
        "fuse_qkv,channels_last,compile,cuda_graphs,fp8",
    ]


def test_the_default_run_is_sized_for_ten_minutes_on_one_gpu() -> None:
    """Issue 10 §7: the defaults are naive, eager and compiled rows side by side plus the check, for 1 and 4
    steps at batch 1 and 8; the slow sections (server, levers, ready) are asked for by name."""
    import bench

    args = bench.parse_args([])
    assert args.sections == ["naive", "eager", "engine", "equivalence"]
    assert args.steps == [1, 4] and args.batch_sizes == [1, 8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-sizes", "16"])


@pytest.fixture(scope="module")
def naive_reference(tiny_models: bench_models.ModelSet):
    """The stock pipeline's output at SEED and SEED + 1 (4 steps, fp32), and the inputs it was given."""
    inputs = bench_measure.make_inputs(64, 48)
    pipe = bench_models.load_naive(tiny_models, CPU, torch.float32)
    pipe.scheduler = bench_models.naive_scheduler(tiny_models, 4)
    seed = 1234
    reference = bench_measure.naive_output(pipe, inputs, 4, seed)
    contrast = bench_measure.naive_output(pipe, inputs, 4, seed + 1)
    return inputs, seed, reference, contrast


@pytest.fixture(scope="module")
def bench_engine(tiny_models: bench_models.ModelSet):
    return bench_models.load_engine(tiny_models, [4], CPU, torch.float32, safety_checker=False)


TOLERANCES = bench_measure.Tolerances(latent_rel=0.05, pixel_rms=4.0)


def check(naive_reference, engine_out) -> dict:
    inputs, _, reference, contrast = naive_reference
    return bench_measure.check_equivalence(reference, contrast, engine_out, inputs, 4, TOLERANCES)


def test_the_engine_loads_the_written_folder_through_its_overrides(tiny_models, bench_engine) -> None:
    variant = bench_engine.variants[(bench_models.APP, 4)]
    assert variant.checkpoint.path == tiny_models.unet_file
    assert variant.base.path == tiny_models.base and variant.vae.path == tiny_models.vae


def test_a_foreign_models_dir_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "precious.safetensors").write_bytes(b"not ours")
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        bench_models.ensure_model_set(tmp_path, bench_models.architecture("tiny"), 0, CPU)
    assert (tmp_path / "precious.safetensors").read_bytes() == b"not ours"


def test_equivalence_check_passes_for_the_same_computation(naive_reference, bench_engine) -> None:
    inputs, seed, _, _ = naive_reference
    result = check(naive_reference, bench_measure.engine_output(bench_engine, inputs, 4, seed))
    assert result["passed"], result
    assert result["engine_vs_naive"]["latent_rel_l2"] < 1e-4  # fp32 on both sides: the same numbers


def test_equivalence_check_fails_for_another_seed(naive_reference, bench_engine) -> None:
    inputs, seed, _, _ = naive_reference
    result = check(naive_reference, bench_measure.engine_output(bench_engine, inputs, 4, seed + 7))
    assert not result["passed"] and not result["within_tolerance"], result


def test_equivalence_check_fails_for_other_weights(naive_reference, bench_engine) -> None:
    """Other random weights of the same distribution (each tensor's values shuffled), as a wrong checkpoint."""
    inputs, seed, _, _ = naive_reference
    unet = bench_engine.pipeline(bench_engine.variants[(bench_models.APP, 4)]).unet
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for param in unet.parameters():
                shuffled = param.flatten()[torch.randperm(param.numel(), generator=generator)]
                param.copy_(shuffled.view_as(param))
        result = check(naive_reference, bench_measure.engine_output(bench_engine, inputs, 4, seed))
    finally:
        unet.load_state_dict(saved)
    assert not result["passed"] and not result["within_tolerance"], result


def test_equivalence_check_fails_when_the_tolerance_cannot_tell_seeds_apart(naive_reference) -> None:
    """A tolerance so loose that another seed passes too proves nothing, so the check fails."""
    inputs, _, reference, contrast = naive_reference
    loose = bench_measure.Tolerances(latent_rel=100.0, pixel_rms=255.0)
    result = bench_measure.check_equivalence(reference, contrast, reference, inputs, 4, loose)
    assert result["within_tolerance"] and not result["tolerance_discriminates"] and not result["passed"]


def test_row_summary_percentiles_throughput_and_floor_share() -> None:
    row = bench_measure.Row("engine", 4, 2, None, images=8, wall_s=2.0, latencies_s=[0.4, 0.5, 0.6, 0.5])
    summary = row.summary(tflop_per_image=42.51, rate_tflops=790.0)
    assert summary["p50_ms"] == 500.0 and summary["p99_ms"] == pytest.approx(597.0)
    assert summary["images_per_s"] == 4.0
    assert summary["floor_share"] == pytest.approx(42.51 * 4.0 / 790.0, abs=1e-6)
    assert row.summary(42.51, None)["floor_share"] is None


def test_full_size_configs_match_the_published_parameter_and_flop_counts() -> None:
    """The §9.5 configs the GPU run builds: 2,567,463,684 UNet parameters and perf-anchors.md's FLOPs."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench_models.FULL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    components = bench_models.counted_tflop(bench_models.architecture("full"), 1024, 1024)
    for n, anchored in bench_models.ANCHOR_TFLOP_1024.items():
        assert bench_models.floor_tflop(components, n) == pytest.approx(anchored, rel=1e-3)


def test_the_preview_bench_times_the_same_batch_with_and_without_previews(
    tiny_models: bench_models.ModelSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import bench_previews

    out = tmp_path / "previews.json"
    argv = ["--device", "cpu", "--models-dir", str(tiny_models.root), "--resolution", "64", "--steps", "2"]
    assert bench_previews.main([*argv, "--batch", "2", "--num-images", "2", "--repeats", "1", "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["preview_size"] == "8x8" and numbers["batch"] == 2 and numbers["num_images"] == 2
    assert numbers["step_ms_without"] > 0 and numbers["step_ms_with"] > 0 and numbers["preview_op_ms"] > 0
    assert math.isclose(numbers["ratio"], numbers["step_ms_with"] / numbers["step_ms_without"], rel_tol=1e-2)
    assert numbers["jpeg_bytes_per_image"] > 0 and numbers["encode_ms_per_request"] > 0
    assert "ms without previews" in capsys.readouterr().out
