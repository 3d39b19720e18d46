"""Bad requests and bad model files: each is refused with an error naming the problem, and nothing breaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.engine import Engine
from pipelines.errors import InputError, ModelFileError
from pipelines.specs import apply_overrides
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image, png

LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
HYPER = "fal-ai/hyper-sdxl/inpainting"
SIZE = (64, 48)


def request(**kw) -> InpaintRequest:
    fields = dict(
        app_id=LIGHTNING,
        image=png(noise_image(64, 48, seed=1)),
        mask=png(box_mask(64, 48)),
        prompt="a photo",
        steps=2,
        seed=3,
        image_size=SIZE,
    )
    fields.update(kw)
    return InpaintRequest(**fields)


def assert_serves(engine) -> None:
    (result,) = engine.run([request()])
    assert result.error is None
    assert [im.size for im in result.images] == [SIZE]


BAD_REQUESTS = {
    "image-bytes": ({"image": b"not an image"}, "image_url"),
    "image-empty": ({"image": b""}, "image_url"),
    "image-truncated-png": ({"image": png(noise_image())[:60]}, "image_url"),
    "mask-bytes": ({"mask": b"\x89PNG garbage"}, "mask_url"),
    "image-zero-size": ({"image": Image.new("RGB", (0, 0))}, "image_url"),
    "mask-zero-size": ({"mask": Image.new("L", (0, 0))}, "mask_url"),
    "num-images-0": ({"num_images": 0}, "num_images"),
    "num-images-9": ({"num_images": 9}, "num_images"),
    "num-images-bool": ({"num_images": True}, "num_images"),
    "steps-3-lightning": ({"steps": 3}, "num_inference_steps"),
    "steps-8-hyper": ({"app_id": HYPER, "steps": 8}, "num_inference_steps"),
    "steps-str": ({"steps": "4"}, "num_inference_steps"),
    "strength-0": ({"strength": 0}, "strength"),
    "strength-negative": ({"strength": -0.1}, "strength"),
    "strength-1.5": ({"strength": 1.5}, "strength"),
    "strength-too-low-for-steps": ({"steps": 8, "strength": 0.001}, "strength"),
    "image-size-zero-width": ({"image_size": (0, 10)}, "image_size"),
    "image-size-negative": ({"image_size": (64, -1)}, "image_size"),
    "image-size-huge": ({"image_size": (64, 10**6)}, "image_size"),
    "unknown-app": ({"app_id": "fal-ai/no-such-app/inpainting"}, "app_id"),
    "seed-too-big": ({"seed": 2**64}, "seed"),
    "strength-nan": ({"strength": float("nan")}, "strength"),
    "strength-inf": ({"strength": float("inf")}, "strength"),
    "prompt-unpaired-surrogate": ({"prompt": "a \ud800 door"}, "prompt"),  # "\ud800" in JSON
    "prompt-surrogate-escape": ({"prompt": "a \udcff door"}, "prompt"),  # a non-UTF-8 byte in argv (generate)
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_request_names_the_field(engine, kind):
    changes, field = BAD_REQUESTS[kind]
    bad = request(**changes)
    with pytest.raises(InputError) as info:
        engine.prepare(bad)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    (result,) = engine.run([bad])
    assert isinstance(result.error, InputError)
    assert result.error.field == field
    assert result.images == []


@pytest.mark.parametrize(
    "kind", ["image-bytes", "strength-1.5", "num-images-9", "unknown-app", "prompt-surrogate-escape"]
)
def test_bad_request_does_not_spoil_its_batch(engine, kind):
    changes, field = BAD_REQUESTS[kind]
    bad, good = request(request_id="bad", **changes), request(request_id="good", num_images=2)
    results = engine.run([bad, good])
    assert [r.request_id for r in results] == ["bad", "good"]
    assert isinstance(results[0].error, InputError) and results[0].error.field == field
    assert results[1].error is None
    assert [im.size for im in results[1].images] == [SIZE, SIZE]
    assert results[1].has_nsfw_concepts == [False, False]


def test_good_request_first_then_bad(engine):
    results = engine.run([request(request_id="good"), request(request_id="bad", mask=b"nope")])
    assert results[0].error is None and len(results[0].images) == 1
    assert isinstance(results[1].error, InputError) and results[1].error.field == "mask_url"


# ---------------------------------------------------------------------------------------------- model files


def snapshot_file(tiny_cache: Path, repo: str, name: str) -> Path:
    (path,) = (tiny_cache / f"models--{repo.replace('/', '--')}" / "snapshots").glob(f"*/{name}")
    return path


@pytest.fixture(scope="module")
def unet_state(tiny_cache) -> dict[str, torch.Tensor]:
    return load_file(
        str(snapshot_file(tiny_cache, "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors"))
    )


def load_with(spec, resolver, key: str, path: Path, variant: tuple[str, int]) -> Engine:
    overridden = apply_overrides(spec, {key: path})
    return Engine.load(overridden, resolver=resolver, variants=[variant], safety_checker=False, prompt_expansion=False)


def bad_unet_files(tmp: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[Path, str]]:
    pickled = tmp / "pickled.safetensors"
    torch.save(state, pickled)
    wrong_shape = dict(state)
    conv = state["conv_in.weight"]
    wrong_shape["conv_in.weight"] = torch.zeros(conv.shape[0] + 1, *conv.shape[1:])
    save_file(wrong_shape, tmp / "wrong_shape.safetensors")
    missing = {k: v for k, v in state.items() if not k.startswith("conv_out.")}
    save_file(missing, tmp / "missing.safetensors")
    extra = {**state, "not.a.unet.key": torch.zeros(1)}
    save_file(extra, tmp / "extra.safetensors")
    truncated = tmp / "truncated.safetensors"
    save_file(state, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    other_name = tmp / "unet.ckpt"
    save_file(state, other_name)
    return {
        "pickle-renamed": (pickled, "not a valid safetensors"),
        "wrong-shape": (tmp / "wrong_shape.safetensors", "conv_in.weight"),
        "missing-keys": (tmp / "missing.safetensors", "missing key"),
        "unexpected-keys": (tmp / "extra.safetensors", "not.a.unet.key"),
        "truncated": (truncated, "not a valid safetensors"),
        "not-safetensors-name": (other_name, ".safetensors"),
        "no-such-file": (tmp / "absent.safetensors", "absent.safetensors"),
    }


KINDS = [
    "pickle-renamed",
    "wrong-shape",
    "missing-keys",
    "unexpected-keys",
    "truncated",
    "not-safetensors-name",
    "no-such-file",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_unet_file_is_a_model_file_error(engine, spec, resolver, unet_state, tmp_path, kind):
    path, words = bad_unet_files(tmp_path, unet_state)[kind]
    with pytest.raises(ModelFileError) as info:
        load_with(spec, resolver, "fast-lightning-sdxl:4", path, ("fast-lightning-sdxl", 4))
    assert words in str(info.value)
    assert_serves(engine)


def test_lora_matching_no_layer_is_a_model_file_error(engine, spec, resolver, tmp_path):
    path = tmp_path / "nothing_lora.safetensors"
    save_file({"unet.nothing.lora_A.weight": torch.zeros(4, 8), "unet.nothing.lora_B.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(ModelFileError) as info:
        load_with(spec, resolver, "hyper-sdxl:2", path, ("hyper-sdxl", 2))
    assert "not found in the base model" in str(info.value) or "matched" in str(info.value)
    assert_serves(engine)


def test_lora_with_text_encoder_keys_is_refused(engine, spec, resolver, tmp_path):
    path = tmp_path / "te_lora.safetensors"
    save_file(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
        },
        path,
    )
    with pytest.raises(ModelFileError):
        load_with(spec, resolver, "hyper-sdxl:2", path, ("hyper-sdxl", 2))
    assert_serves(engine)


def test_empty_safetensors_lora_is_refused(engine, spec, resolver, tmp_path):
    path = tmp_path / "empty_lora.safetensors"
    save_file({}, path)
    with pytest.raises(ModelFileError) as info:
        load_with(spec, resolver, "hyper-sdxl:2", path, ("hyper-sdxl", 2))
    assert "no LoRA weights" in str(info.value)
    assert_serves(engine)


@pytest.mark.parametrize("kind", ["wrong-shape", "missing-keys"])
def test_model_file_error_names_the_overriding_file(spec, resolver, unet_state, tmp_path, kind):
    path, _ = bad_unet_files(tmp_path, unet_state)[kind]
    with pytest.raises(ModelFileError) as info:
        load_with(spec, resolver, "fast-lightning-sdxl:4", path, ("fast-lightning-sdxl", 4))
    assert path.name in str(info.value)


def test_valid_unet_override_loads(spec, resolver, unet_state, tmp_path):
    path = tmp_path / "copy.safetensors"
    save_file(unet_state, path)
    loaded = load_with(spec, resolver, "fast-lightning-sdxl:4", path, ("fast-lightning-sdxl", 4))
    (result,) = loaded.run([request(steps=4)])
    assert result.error is None and result.images[0].size == SIZE
