"""Random-weight SDXL models for scripts/bench.py: writing them once, loading them, counting their FLOPs.

The models are written in the Hugging Face layout (fp16 safetensors) so that the engine and the server
load them through their normal loader (``--model-path`` overrides) and the stock pipeline through
``from_pretrained``: both read the same files, so they compute with the same weights.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.engine import Engine
from pipelines.optimize import SpeedOptions

if TYPE_CHECKING:
    from diffusers import SchedulerMixin, StableDiffusionXLInpaintPipeline

APP = "fal-ai/fast-lightning-sdxl/inpainting"
APP_NAME = "fast-lightning-sdxl"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MARKER = "bench-models.json"
MODELS_VERSION = 1

# perf-anchors.md §3: TFLOP per 1024x1024 image, batch 1, no CFG, one VAE encode
# (UNet 6.761 per step, VAE encode 4.879, VAE decode 10.470, both text encoders 0.111).
ANCHOR_TFLOP_1024 = {1: 22.22, 2: 28.98, 4: 42.51, 8: 69.55}


def log(message: str) -> None:
    """Progress goes to stderr; stdout is the table."""
    print(message, file=sys.stderr, flush=True)


# -- architectures ------------------------------------------------------------------------------------

# SDXL base 1.0, model-recipes.md §9.5 (2,567,463,684 / 83,653,863 / 123,060,480 / 694,659,840 parameters).
FULL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "addition_embed_type_num_heads": 64,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
FULL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
FULL_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
}
FULL_TEXT_2: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "vocab_size": 49408,
}
# CompVis/stable-diffusion-safety-checker: a CLIP ViT-L/14 vision tower (only with --safety-checker).
FULL_SAFETY_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
FULL_SAFETY_PROJECTION = 768


@dataclass(frozen=True)
class Architecture:
    """Configs of every component; ``vocab_size`` None means: the tokenizer's length."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    safety_vision: dict[str, Any]
    safety_projection: int


def architecture(name: str) -> Architecture:
    """``full`` (SDXL base) or ``tiny`` (the test models of pipelines/tiny.py, same topology)."""
    if name == "full":
        return Architecture(
            "full", FULL_UNET, FULL_VAE, FULL_TEXT, FULL_TEXT_2, FULL_SAFETY_VISION, FULL_SAFETY_PROJECTION
        )
    from pipelines import tiny

    vae = {k: v for k, v in tiny.VAE_CONFIG.items() if k != "force_upcast"}
    # The text encoders and safety checker as pipelines/tiny.py builds them (_base_files, _safety_checker_files).
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4}
    text_2 = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    return Architecture(
        "tiny",
        dict(tiny.UNET_CONFIG),
        vae,
        {**text, "hidden_act": "quick_gelu", "projection_dim": 32, "vocab_size": None},
        {**text_2, "hidden_act": "gelu", "projection_dim": 64, "vocab_size": None},
        {**vision, "image_size": 224, "patch_size": 14},
        32,
    )


# -- the model folder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSet:
    """Random-weight models in the Hugging Face layout, written by :func:`ensure_model_set`.

    ``base/`` is laid out like stabilityai/stable-diffusion-xl-base-1.0 (fp16 variant files, its ``vae/``
    with the stock ``force_upcast: true``); ``vae-fp16-fix/`` holds the same VAE weights with
    ``force_upcast: false`` like madebyollin/sdxl-vae-fp16-fix; the checkpoint of every step count is
    the base UNet file (SDXL-Lightning ships full UNets with exactly that layout).
    """

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def vae(self) -> Path:
        return self.root / "vae-fp16-fix"

    @property
    def safety_checker(self) -> Path:
        return self.root / "safety-checker"

    @property
    def unet_file(self) -> Path:
        return self.base / "unet" / "diffusion_pytorch_model.fp16.safetensors"

    def overrides(self, steps: Sequence[int]) -> dict[str, str]:
        """``--model-path`` overrides that make the server's configs load this folder."""
        paths = {"base": str(self.base), "vae": str(self.vae), "safety_checker": str(self.safety_checker)}
        paths.update({f"{APP_NAME}:{n}": str(self.unet_file) for n in steps})
        return paths


def default_models_dir(arch: str, seed: int) -> Path:
    """``$XDG_CACHE_HOME/inpaint-server/bench/...`` (``~/.cache`` by default): about 8 GB at full size."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "inpaint-server" / "bench" / f"sdxl-{arch}-random-seed{seed}"


def _marker(arch: Architecture, seed: int) -> dict[str, Any]:
    """What a written folder must match to be reused (the device it was written on does not matter:
    every section loads the same files, whichever random stream made them)."""
    return {"version": MODELS_VERSION, "architecture": json.loads(json.dumps(asdict(arch))), "seed": seed}


def ensure_model_set(root: Path, arch: Architecture, seed: int, device: torch.device) -> ModelSet:
    """Write the random-weight models to ``root`` unless a complete set with these configs is there.

    Weights are initialised on ``device`` (fast on a GPU) from ``seed`` and saved as fp16. The folder is
    built beside ``root`` and renamed into place with the marker written last, so a half-written set is
    never used; a non-empty folder without our marker is refused rather than overwritten.
    """
    root = Path(root)
    wanted = _marker(arch, seed)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        found = json.loads((root / MARKER).read_text())
        if {k: found.get(k) for k in wanted} == wanted:
            return ModelSet(root)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise SystemExit(f"{root} is not empty and holds no {MARKER}; refusing to overwrite it (pick --models-dir)")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; this is a model cache like any other
        started = time.perf_counter()
        log(f"writing {arch.name} random-weight models to {root} (once)")
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # leave the caller's random state alone
            _write_models(staging, arch, seed, device)
        (staging / MARKER).write_text(json.dumps({**wanted, "written_on": device.type}, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.rename(staging, root)
        log(f"wrote them in {time.perf_counter() - started:.1f} s")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelSet(root)


def _write_models(root: Path, arch: Architecture, seed: int, device: torch.device) -> None:
    """Every component with default (random) init on ``device``, saved the way the hub repos ship them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipelines import tiny

    base = root / "base"
    fp16 = {"variant": "fp16", "max_shard_size": "100GB"}  # one file per component, as the hub repos have
    _write_json(base / "model_index.json", tiny.SDXL_MODEL_INDEX)
    _write_json(base / "scheduler" / "scheduler_config.json", tiny.SDXL_SCHEDULER_CONFIG)
    # The CLIP BPE tokenizer pipelines/tiny.py writes (SDXL's layout: tokenizer_2 pads with "!").
    for folder, pad in (("tokenizer", tiny.EOS), ("tokenizer_2", "!")):
        for name, content in tiny._clip_tokenizer_files(pad).items():
            (base / folder).mkdir(parents=True, exist_ok=True)
            (base / folder / name).write_bytes(content)
    vocab = len(CLIPTokenizer.from_pretrained(base / "tokenizer"))

    def seeded(k: int) -> None:
        torch.manual_seed(seed * 1000 + k)  # per component, so each is the same whatever else changes

    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "max_position_embeddings": 77}
    with torch.device(device):
        for k, (folder, cls, dims) in enumerate(
            (
                ("text_encoder", CLIPTextModel, arch.text_encoder),
                ("text_encoder_2", CLIPTextModelWithProjection, arch.text_encoder_2),
            )
        ):
            seeded(k)
            config = CLIPTextConfig(**{**dims, "vocab_size": dims["vocab_size"] or vocab}, **ids)
            model = cls(config).eval().half()
            model.save_pretrained(base / folder, safe_serialization=True, **fp16)
            del model
        seeded(2)
        unet = UNet2DConditionModel(**arch.unet).eval().half()
        unet.save_pretrained(base / "unet", safe_serialization=True, **fp16)
        del unet
        seeded(3)
        vae = AutoencoderKL(**arch.vae, force_upcast=True).eval().half()
        vae.save_pretrained(base / "vae", safe_serialization=True, **fp16)  # the stock SDXL VAE settings
        vae.register_to_config(force_upcast=False)  # the fp16-fix VAE's settings, same weights
        vae.save_pretrained(root / "vae-fp16-fix", safe_serialization=True)
        del vae
        seeded(4)
        config = CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
            vision_config=arch.safety_vision,
            projection_dim=arch.safety_projection,
        )
        # Thresholds stay at their init (1.0): a cosine never exceeds 1, so nothing is ever flagged.
        checker = StableDiffusionSafetyChecker(config).eval().half()
        checker.save_pretrained(root / "safety-checker", safe_serialization=True)
        del checker
    _write_json(root / "safety-checker" / "preprocessor_config.json", tiny.CLIP_IMAGE_PROCESSOR_CONFIG)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- loading ------------------------------------------------------------------------------------------


# The levers of pipelines/optimize.py, in the order the lever sweep adds them (cuda_graphs needs compile).
LEVERS = ("fuse_qkv", "channels_last", "compile", "cuda_graphs")
# Levers that change what is computed or a backend choice: swept one at a time on top of "auto".
OPTIONAL_LEVERS = ("cudnn_attention", "fp8")


def speed_options(text: str, device: torch.device, cache_dir: Path | None, backend: str = "inductor") -> SpeedOptions:
    """``--speed``: ``auto`` (what the server uses on this device), ``none``, or levers joined by commas
    (``LEVERS``, and ``cudnn_attention`` or ``fp8`` on top). ``backend`` is torch.compile's (``eager``
    traces without generating code: the CPU smoke tests)."""
    if text == "auto":
        return SpeedOptions.for_device(device, cache_dir=cache_dir, compile_backend=backend)
    chosen = set() if text == "none" else {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(LEVERS) - set(OPTIONAL_LEVERS)
    if unknown:
        known = ",".join(LEVERS + OPTIONAL_LEVERS)
        raise ValueError(f"--speed: unknown lever(s) {sorted(unknown)}; use auto, none or {known}")
    if "cuda_graphs" in chosen and "compile" not in chosen:
        raise ValueError("--speed: cuda_graphs needs compile")
    return SpeedOptions(
        **{lever: lever in chosen for lever in LEVERS},
        attention="cudnn" if "cudnn_attention" in chosen else "auto",
        fp8="fp8" in chosen,
        cache_dir=cache_dir,
        compile_backend=backend,
    )


def compile_cache(models: ModelSet) -> Path:
    """Inductor's cache for these models: next to them, so a second run on the machine compiles from cache."""
    return models.root / "compile-cache"


def speed_label(options: SpeedOptions) -> str:
    """``fuse_qkv+channels_last+compile+cuda_graphs``, or ``none``."""
    chosen = [lever for lever in LEVERS if getattr(options, lever)]
    chosen += ["cudnn_attention"] * (options.attention == "cudnn") + ["fp8"] * options.fp8
    return "+".join(chosen) or "none"


def load_engine(
    models: ModelSet,
    steps: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    safety_checker: bool,
    speed: SpeedOptions | None = None,
    warm_size: tuple[int, int] | None = None,
) -> Engine:
    """The engine through its normal loader (the served configs with ``--model-path`` overrides), warmed
    as the server warms it before ready when it compiles: every variant and batch bucket at ``warm_size``
    (compiling the shared graphs and recording the CUDA graphs), then sealed. ``engine.bench_times`` holds
    the seconds the load and that warm-up took."""
    from pipelines.hub import Resolver
    from pipelines.specs import load_serving_spec
    from pipelines.warmup import plan_warmup, run_units

    spec = load_serving_spec(None, models.overrides(steps))
    started = time.perf_counter()
    engine = Engine.load(
        spec,
        device=device,
        dtype=dtype,
        resolver=Resolver(local_files_only=True),
        variants=[(APP, n) for n in steps],
        safety_checker=safety_checker,
        prompt_expansion=False,
        speed=speed,
    )
    loaded = time.perf_counter()
    if engine.speed.compile and warm_size is not None:
        run_units(engine, plan_warmup(engine, [warm_size], warm_size).ready, "bench")
        engine.seal_compiled_shapes()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    engine.bench_times = {"load_s": round(loaded - started, 2), "warmup_s": round(time.perf_counter() - loaded, 2)}
    log(
        f"engine {speed_label(engine.speed)}: loaded in {loaded - started:.1f} s, warmed in "
        f"{engine.bench_times['warmup_s']:.1f} s ({len(engine.graphs)} CUDA graphs)"
    )
    return engine


def load_naive(models: ModelSet, device: torch.device, dtype: torch.dtype) -> StableDiffusionXLInpaintPipeline:
    """The model-card recipe: the UNet from the checkpoint file, then the base pipeline around it.

    The card builds the UNet with ``from_config`` on the CPU and moves it; building it on the meta
    device and assigning the file's tensors gives the same module without 30 s of random init.
    """
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(models.base, subfolder="unet"))
    unet.load_state_dict(load_file(models.unet_file, device=str(device)), strict=True, assign=True)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
        models.base, unet=unet.to(dtype), dtype=dtype, variant="fp16", add_watermarker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def naive_scheduler(models: ModelSet, steps: int) -> SchedulerMixin:
    """The card's scheduler for this step count, made from the base repo's scheduler config like the card
    does: Euler with "trailing" spacing (and x0 prediction for the 1-step checkpoint)."""
    from pipelines.schedules import SCHEDULERS
    from pipelines.specs import load_serving_spec

    variant = load_serving_spec().app(APP).variants[steps]
    cls = SCHEDULERS[variant.scheduler_class]
    return cls.from_config(cls.load_config(models.base, subfolder="scheduler"), **dict(variant.scheduler_options))


def quiet_libraries() -> None:
    """Library warnings and progress bars off: the table and the progress lines are the output."""
    import warnings

    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for category in (FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(diffusers|transformers|torch)\b")


def free() -> None:
    """Give back the device memory of models the caller has just dropped (``del``) its references to."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- FLOPs --------------------------------------------------------------------------------------------


def counted_tflop(arch: Architecture, width: int, height: int) -> dict[str, float]:
    """FLOPs (TFLOP, batch 1) of each component at this size, counted on the meta device.

    Matmuls and convolutions only (attention through the explicit path, so QK^T and AV count), the
    method of perf-anchors.md §3; element-wise work is not counted.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "max_position_embeddings": 77}

    def text_model(cls: type, dims: dict[str, Any]) -> Any:  # the vocabulary size changes no counted FLOP
        return cls(CLIPTextConfig(**{**dims, "vocab_size": dims["vocab_size"] or 1000}, **ids))

    def count(fn: Callable[[], Any]) -> float:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        te1 = text_model(CLIPTextModel, arch.text_encoder)
        te2 = text_model(CLIPTextModelWithProjection, arch.text_encoder_2)
        tokens = torch.zeros(1, 77, dtype=torch.long)
        latent = torch.zeros(1, arch.vae["latent_channels"], height // 8, width // 8)
        cond = {
            "encoder_hidden_states": torch.zeros(1, 77, arch.unet["cross_attention_dim"]),
            "added_cond_kwargs": {
                "text_embeds": torch.zeros(1, arch.text_encoder_2["projection_dim"]),
                "time_ids": torch.zeros(1, 6),
            },
        }
        return {
            "text_encoders": count(
                lambda: (te1(tokens, output_hidden_states=True), te2(tokens, output_hidden_states=True))
            ),
            "vae_encode": count(lambda: vae.encode(torch.zeros(1, 3, height, width))),
            "unet_step": count(lambda: unet(latent, torch.tensor([999]), **cond)),
            "vae_decode": count(lambda: vae.decode(latent)),
        }


def floor_tflop(components: dict[str, float], steps: int) -> float:
    """Least work for one image: text encoders, one VAE encode, ``steps`` UNet calls, one decode."""
    return (
        components["text_encoders"]
        + components["vae_encode"]
        + steps * components["unet_step"]
        + components["vae_decode"]
    )
