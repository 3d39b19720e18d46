"""Loading weights: one copy of each shared component, one UNet per distinct checkpoint.

Text encoders, tokenizers and the VAE are loaded once per repo and shared by every variant that
names the same repo. Full UNet checkpoints are built on the meta device and filled straight from
the safetensors file; LoRA checkpoints are fused once into a private copy of the base UNet and then
unloaded, so no LoRA layers remain at inference time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelFileError
from .hub import VAE_FILES, Resolver, base_files, resolve_checkpoint, resolve_repo
from .specs import CheckpointSpec, RepoSpec, VariantSpec

log = logging.getLogger(__name__)


@dataclass
class TextStack:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle renamed .safetensors, a truncated file) is refused."""
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path.name}: only .safetensors files are loaded")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path.name} is not a valid safetensors file: {exc}") from exc


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], name: str) -> None:
    """Refuse a checkpoint whose keys or shapes differ from the model's, naming the first differences."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatch(es) e.g. {k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        )
    raise ModelFileError(f"{name} does not match the SDXL UNet of the base model: {'; '.join(parts)}")


M = TypeVar("M", bound=torch.nn.Module)


def frozen(module: M, device: torch.device | str | None = None) -> M:
    """``module`` on ``device`` in eval mode with no parameter requiring grad: inference only.

    Every model the engine loads goes through here. With a parameter that requires grad, each forward
    outside ``no_grad``/``inference_mode`` records an autograd graph, and any output kept (the prompt
    cache keeps embeddings) holds that graph's activations alive: about 124 MiB per cached prompt with
    the full-size text encoders.
    """
    if device is not None:
        module = module.to(device)
    return module.eval().requires_grad_(False)


class ModelStore:
    """Loads and caches components on one device, keyed by what they were loaded from."""

    def __init__(self, device: torch.device, dtype: torch.dtype, resolver: Resolver) -> None:
        self.device = device
        self.dtype = dtype
        self.resolver = resolver
        self._cache: dict[tuple, Any] = {}

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def base_folder(self, base: RepoSpec, with_unet_weights: bool = False) -> Path:
        return self._cached(
            ("base-folder", base.key, with_unet_weights),
            lambda: resolve_repo(base, base_files(base, with_unet_weights), self.resolver, "base"),
        )

    def text_stack(self, base: RepoSpec) -> TextStack:
        def build() -> TextStack:
            folder = self.base_folder(base)
            kw = {"variant": base.variant, "use_safetensors": True, "dtype": self.dtype}
            return TextStack(
                tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                text_encoder=frozen(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw), self.device),
                text_encoder_2=frozen(
                    CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kw), self.device
                ),
            )

        return self._cached(("text", base.key), build)

    def scheduler_config(self, base: RepoSpec) -> dict[str, Any]:
        from diffusers import EulerDiscreteScheduler

        return self._cached(
            ("scheduler", base.key),
            lambda: dict(EulerDiscreteScheduler.load_config(self.base_folder(base), subfolder="scheduler")),
        )

    def unet_config(self, base: RepoSpec) -> dict[str, Any]:
        return self._cached(
            ("unet-config", base.key),
            lambda: dict(UNet2DConditionModel.load_config(self.base_folder(base), subfolder="unet")),
        )

    def vae(self, spec: RepoSpec) -> AutoencoderKL:
        def build() -> AutoencoderKL:
            folder = resolve_repo(spec, VAE_FILES, self.resolver, "vae")
            return frozen(AutoencoderKL.from_pretrained(folder, use_safetensors=True, dtype=self.dtype), self.device)

        return self._cached(("vae", spec.key), build)

    def _empty_unet(self, base: RepoSpec) -> UNet2DConditionModel:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(self.unet_config(base))

    def _base_unet_state(self, base: RepoSpec) -> dict[str, torch.Tensor]:
        def build() -> dict[str, torch.Tensor]:
            suffix = f".{base.variant}" if base.variant else ""
            path = self.base_folder(base, with_unet_weights=True) / f"unet/diffusion_pytorch_model{suffix}.safetensors"
            return read_safetensors(path, "cpu")

        return self._cached(("base-unet-state", base.key), build)

    def unet(self, variant: VariantSpec) -> UNet2DConditionModel:
        """The UNet for a variant; variants naming the same checkpoint share one instance."""
        ckpt = variant.checkpoint
        return self._cached(
            ("unet", variant.base.key, ckpt.key),
            lambda: self._load_unet(variant.base, ckpt, variant.override_key),
        )

    def _load_unet(self, base: RepoSpec, ckpt: CheckpointSpec, key: str) -> UNet2DConditionModel:
        path = resolve_checkpoint(ckpt, self.resolver, key)
        unet = self._empty_unet(base)
        expected = unet.state_dict()
        if ckpt.kind == "unet":
            state = read_safetensors(path, self.device)
            check_state_dict(expected, state, path.name)
            unet.load_state_dict(state, strict=True, assign=True)
            unet.to(device=self.device, dtype=self.dtype)
        else:
            base_state = self._base_unet_state(base)
            check_state_dict(expected, base_state, f"{base.repo} unet")
            unet = unet.to(dtype=self.dtype).to_empty(device=self.device)
            unet.load_state_dict(base_state, strict=True)
            fuse_lora(unet, read_safetensors(path, "cpu"), ckpt.lora_scale, path.name)
        log.info("loaded UNet %s (%s) for %s", ckpt.file, ckpt.kind, key)
        return frozen(unet, self.device)

    def pipeline(self, variant: VariantSpec, pipeline_cls: type[StableDiffusionXLInpaintPipeline]):
        """A pipeline object for a variant, sharing every component it can."""
        text = self.text_stack(variant.base)
        from .schedules import make_scheduler

        return self._cached(
            ("pipeline", variant.base.key, variant.vae.key, variant.checkpoint.key, variant.scheduler_class),
            lambda: pipeline_cls(
                vae=self.vae(variant.vae),
                text_encoder=text.text_encoder,
                text_encoder_2=text.text_encoder_2,
                tokenizer=text.tokenizer,
                tokenizer_2=text.tokenizer_2,
                unet=self.unet(variant),
                scheduler=make_scheduler(variant, self.scheduler_config(variant.base)),
                add_watermarker=False,
            ),
        )


def fuse_lora(unet: UNet2DConditionModel, lora: dict[str, torch.Tensor], scale: float, name: str) -> None:
    """Fuse a LoRA (diffusers/PEFT or kohya/SGM layout) into ``unet`` and drop the LoRA layers.

    Text-encoder parts of a LoRA are refused: the text encoders are shared by every variant.
    """
    try:
        state, alphas = StableDiffusionXLInpaintPipeline.lora_state_dict(dict(lora), unet_config=unet.config)
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        raise ModelFileError(f"{name} is not a LoRA diffusers can read: {exc}") from exc
    if not state:
        raise ModelFileError(f"{name} holds no LoRA weights")
    text_keys = [k for k in state if k.startswith(("text_encoder.", "text_encoder_2."))]
    if text_keys:
        raise ModelFileError(
            f"{name} also patches the text encoders ({len(text_keys)} keys); only UNet LoRAs are supported"
        )
    adapter = "fused"
    try:
        StableDiffusionXLInpaintPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{name} does not fit the SDXL UNet: {str(exc).splitlines()[0]}") from exc
    touched = sum(1 for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    if touched == 0:
        raise ModelFileError(f"{name}: no LoRA key matched a layer of the SDXL UNet")
    unet.fuse_lora(lora_scale=scale, safe_fusing=True, adapter_names=[adapter])
    unet.unload_lora()
    left = [n for n, _ in unet.named_parameters() if "lora_" in n]
    if left:
        raise ModelFileError(f"{name}: LoRA layers remained after fusing ({left[0]})")
