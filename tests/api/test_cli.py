"""``inpaint-server`` as a user runs it: a subprocess, JSON alone on stdout, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import box_mask, noise_image
from tests.live import free_port

CLI = [sys.executable, "-m", "server.cli"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """Inputs on disk and a data directory whose tiny models are already generated."""
    work = tmp_path_factory.mktemp("cli")
    noise_image(96, 64, seed=1).save(work / "photo.png")
    box_mask(96, 64).save(work / "mask.png")
    box_mask(48, 32).save(work / "half-mask.png")
    shutil.copytree(tiny_cache, work / "data" / "tiny-models" / "hub", symlinks=True)
    return work


def run(args: list[str], workdir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "INPAINT_DATA_DIR": str(workdir / "data"), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        CLI + args, cwd=workdir, env=environment, capture_output=True, text=True, timeout=300, check=False
    )


def generate(workdir: Path, *extra: str, mask: str = "mask.png") -> subprocess.CompletedProcess:
    base = ["generate", "--models", "tiny", "--app", "fal-ai/fast-lightning-sdxl/inpainting"]
    base += ["--image", "photo.png", "--mask", mask, "--prompt", "a lighthouse"]
    return run(base + list(extra), workdir)


def test_generate_prints_fal_shaped_json_and_writes_images(workdir):
    """A mask of half the image's size is stretched to it, as fal does, and stderr says so."""
    argv = ["--steps", "2", "--seed", "7", "--num-images", "2", "--format", "png", "--out", "out"]
    proc = generate(workdir, *argv, mask="half-mask.png")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    assert set(payload) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert payload["seed"] == 7 and payload["prompt"] == "a lighthouse"
    assert payload["has_nsfw_concepts"] == [False, False]
    assert payload["timings"]["inference"] > 0
    for item in payload["images"]:
        path = Path(item["url"])
        assert path.is_file() and path.parent == workdir / "out"
        assert item["content_type"] == "image/png" and item["file_size"] == path.stat().st_size
        with Image.open(path) as im:
            assert im.size == (item["width"], item["height"]) == (96, 64)  # the input's own size
    assert "step 2/2" in proc.stderr
    warning = "inpaint-server: WARN The mask is 48x32 but the image is 96x64: the mask was resized to 96x64"
    assert proc.stderr.count(warning) == 1, proc.stderr


def test_generate_is_reproducible_and_honours_image_size(workdir):
    first = generate(workdir, "--seed", "3", "--image-size", "64x48", "--out", "a")
    second = generate(workdir, "--seed", "3", "--image-size", "64x48", "--out", "b")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    one, two = json.loads(first.stdout)["images"][0], json.loads(second.stdout)["images"][0]
    assert (one["width"], one["height"]) == (64, 48)
    assert Path(one["url"]).read_bytes() == Path(two["url"]).read_bytes()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--steps", "3"], "num_inference_steps"),
        (["--strength", "1.5"], "strength"),
        (["--num-images", "9"], "num_images"),
        (["--image-size", "huge"], "image size"),
        (["--format", "gif"], "--format"),
        (["--seed", "abc"], "--seed"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(workdir, extra, needle):
    proc = generate(workdir, *extra)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("inpaint-server: error:")]
    assert len(lines) == 1 and needle in lines[0]


def test_unreadable_image_names_the_field(workdir):
    (workdir / "broken.png").write_bytes(b"not an image")
    proc = run(
        ["generate", "--models", "tiny", "--app", "hyper-sdxl", "--image", "broken.png", "--mask", "mask.png", "-v"],
        workdir,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "inpaint-server: error: the following arguments are required: --prompt" in proc.stderr
    proc = run(
        [
            "generate",
            "--models",
            "tiny",
            "--app",
            "hyper-sdxl",
            "--image",
            "broken.png",
            "--mask",
            "mask.png",
            "--prompt=x",
        ],
        workdir,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "inpaint-server: error: image_url:" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "off"])
def test_missing_models_fail_at_once_naming_repo_files_and_command(workdir, tmp_path, network):
    """An empty cache: with HF_HUB_OFFLINE, or with the network off and nothing said (the Hub refuses
    connections), the error comes at once (no huggingface_hub retries) and names what to fetch, and how."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if network == "HF_HUB_OFFLINE" else "0"}
    if network == "off":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = run(
        ["generate", "--app", "hyper-sdxl", "--image", "photo.png", "--mask", "mask.png", "--prompt", "x"],
        workdir,
        **env,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Retry" not in proc.stderr and elapsed < 20, (elapsed, proc.stderr)  # it used to take ~28 s
    last = proc.stderr.strip().splitlines()[-1]
    assert "stabilityai/stable-diffusion-xl-base-1.0" in last and "tokenizer/" in last
    assert "Hyper-SDXL-1step-Unet.safetensors" in last
    assert "inpaint-server download --app hyper-sdxl" in last
    assert ("HF_HUB_OFFLINE" if network == "HF_HUB_OFFLINE" else "the Hub cannot be reached") in last


def test_download_uses_the_hf_cache_from_hf_home(workdir, tmp_path, tiny_cache):
    """The real loader reads the tiny models through HF_HOME + HF_HUB_OFFLINE, unchanged."""
    shutil.copytree(tiny_cache, tmp_path / "hf" / "hub", symlinks=True)
    proc = run(["download", "--app", "fast-lightning-sdxl"], workdir, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)["files"]
    assert any(f.endswith("sdxl_lightning_8step_unet.safetensors") for f in files)
    assert all(f.startswith(str(tmp_path / "hf" / "hub")) for f in files)


def test_models_make_tiny_writes_an_hf_cache(tmp_path, workdir):
    proc = run(["models", "make-tiny", str(tmp_path / "cache")], workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cache_dir"] == str(tmp_path / "cache")
    assert (tmp_path / "cache" / "models--ByteDance--Hyper-SD").is_dir()


def test_serve_compile_flag_reaches_the_settings(monkeypatch) -> None:
    """``--compile true|false|auto`` becomes the compile setting (None: on with CUDA); other words exit 2."""
    from server import cli

    seen: list[object] = []
    monkeypatch.setattr("server.app.create_app", lambda settings: seen.append(settings.compile) or object())
    monkeypatch.setattr("server.http.draining.run", lambda app, **kwargs: None)
    for word, value in (("true", True), ("false", False), ("auto", None), ("FALSE", False)):
        assert cli.main(["serve", "--compile", word]) == 0
        assert seen[-1] is value
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--compile", "maybe"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--models", "tiny", "--app", "nope", "--image", "{png}", "--mask", "{png}", "--prompt", "x"],
        ["download", "--models", "tiny", "--app", "hyper-sdxl", "--app", "nope"],
        ["serve", "--models", "tiny", "--app", "nope"],
        ["serve", "--models", "tiny", "--apps", "hyper-sdxl:3"],
        ["worker", "--models", "tiny", "--app", "fast-lightning-sdxl:x"],
    ],
)
def test_an_unknown_app_exits_2_like_any_bad_argument(argv, tmp_path, monkeypatch, capsys) -> None:
    """Found before anything loads or starts (no tiny models generated, no server)."""
    from server import cli

    noise_image(16, 16).save(tmp_path / "in.png")
    monkeypatch.setenv("INPAINT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr("server.app.create_app", lambda settings: pytest.fail("serve started"))
    monkeypatch.setattr("server.worker_app.run_worker", lambda settings: pytest.fail("worker started"))
    with pytest.raises(SystemExit) as exc:
        cli.main([a.format(png=tmp_path / "in.png") for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("inpaint-server: error:") and ("nope" in err[-1] or "offers [" in err[-1]), err
    assert not (tmp_path / "data" / "tiny-models").exists()


def test_serve_that_cannot_listen_exits_3(tmp_path) -> None:
    """An API node (no models to load) on a port another socket holds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(["serve", "--workers", "0", "--port", str(port), "--data-dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "address already in use" in proc.stderr.lower()
