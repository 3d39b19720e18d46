"""The few-step latent-blend inpainting recipe on top of diffusers' SDXL inpaint pipeline.

It reuses the stock pipeline's helpers (prompt encoding, time ids, image and mask processors) and
replaces its ``__call__`` with a batch-oriented recipe that:

* runs exactly the given timesteps (strength is applied by choosing them, see ``schedules.py``);
* takes one prompt, image, mask and generator per output image, so requests with different
  prompts and seeds share one UNet batch and image k of a request does not depend on its batch;
* VAE-encodes each input image once (the stock pipeline encodes once per output image and once more
  for the masked image, which a 4-channel UNet never reads);
* lets the caller drop images between steps (cancellation) and report progress, with a preview of each
  step's predicted image (x0, projected to RGB without the VAE: ``previews.py``) for the rows that asked;
* never reads a device value back to the host inside the loop: the scheduler's numbers are
  precomputed Python floats (``sampling.py``), rows are picked with slices, and every input arrives
  on the device before the loop starts (tests/pipelines/test_host_syncs.py).

With one request, strength 1.0 and the same timesteps and generators, its latents equal the stock
pipeline's (tests/pipelines/test_parity.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from . import tensors
from .graphs import UNetCall, plain_call
from .previews import LatentProjection, StepPreview
from .sampling import Sampler

# Called after step i (0-based) with the number of steps; returns the indices (into the current
# batch) of the images to keep going, or None to keep all.
StepHook = Callable[[int, int], "list[int] | None"]
# Called during step i (0-based) with the batch rows previewed and their pixels (see ``DenoiseBatch.preview_rows``).
PreviewHook = Callable[[int, list[int], StepPreview], None]
PROJECTION = LatentProjection()


@dataclass
class DenoiseBatch:
    """Per-row tensors for one UNet batch, on the engine's device. ``image_of[k]`` is the input image of row k.

    Rows past the real ones are padding (a compiled batch bucket): they repeat the last real row with
    noise of their own and are never decoded. Only the real input images are VAE-encoded.
    """

    prompt_embeds: torch.Tensor  # (B, 77, D)
    pooled_embeds: torch.Tensor  # (B, P)
    time_ids: torch.Tensor  # (B, 6): SDXL's size conditioning (see ``FewStepInpaintPipeline.time_ids``)
    images: torch.Tensor  # (R, 3, H, W) in [-1, 1], one per input image (R <= B, no padding)
    masks: torch.Tensor  # (R, 1, H, W) in {0, 1}, 1 = repaint
    image_of: list[int]  # len B
    generators: list[torch.Generator]  # len B
    sampler: Sampler
    full_strength: bool  # strength 1.0: start from pure noise
    # Rows whose requests asked for step previews (real rows only), and who gets them; nothing is computed for
    # the other rows, and nothing at all without a hook.
    preview_rows: tuple[int, ...] = ()
    on_preview: PreviewHook | None = None


@dataclass(frozen=True)
class PromptWindow:
    """``read``: a prefix of the prompt that encodes exactly as the whole prompt does (CLIP's first tokens, up to a
    word boundary); ``ignored``: the part past CLIP's limit, as the user wrote it, or None."""

    read: str
    ignored: str | None = None


FIRST_WINDOW_CHARS = 1024  # about 4x what 75 tokens of ordinary text take
_SPACE = re.compile(r"\s")


def prompt_window(tokenizer: Any, prompt: str, first_chars: int = FIRST_WINDOW_CHARS) -> PromptWindow:
    """Find where CLIP stops reading ``prompt`` without tokenizing all of it (a 10 MB prompt took seconds and
    gigabytes): tokenize a prefix that ends at a space, four times longer each time until it holds more tokens than
    CLIP reads or is the whole prompt.

    A prefix that ends before a whitespace character tokenizes to a prefix of the whole prompt's tokens (CLIP's
    tokenizers split words at whitespace), so the tokens CLIP reads, and the text it ignores, are those of the
    whole prompt. ``encode_prompt`` truncates silently apart from a library log line; the ignored text is reported
    to the user (as diffusers computes it: the tokens between the limit and the end-of-text token).
    """
    limit = tokenizer.model_max_length
    size = first_chars
    while size < len(prompt):
        end = _last_space_before(prompt, size)
        if end > 0:
            ignored = _ignored(tokenizer, prompt[:end], limit)
            if ignored is not None:
                return PromptWindow(prompt[:end], (ignored + prompt[end:]).strip())
        size *= 4
    ignored = _ignored(tokenizer, prompt, limit)
    return PromptWindow(prompt, None if ignored is None else ignored.strip())


def _last_space_before(text: str, size: int) -> int:
    """The index of the last whitespace character in ``text[:size + 1]`` (0 if none)."""
    last = 0
    for match in _SPACE.finditer(text, 0, size + 1):
        last = match.start()
    return last


def _ignored(tokenizer: Any, text: str, limit: int) -> str | None:
    """The part of ``text`` past ``limit`` tokens (start and end tokens included), or None if it fits."""
    try:
        encoded = tokenizer(text, truncation=False, add_special_tokens=True, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer: no offsets, so decode the tokens instead
        ids = tokenizer(text, truncation=False, add_special_tokens=True).input_ids
        return tokenizer.decode(ids[limit - 1 : -1]) if len(ids) > limit else None
    if len(encoded.input_ids) <= limit:
        return None
    # The last slot holds the end-of-text token, so the first token CLIP drops is at limit - 1; its character offset
    # gives the ignored text as the user wrote it.
    return text[encoded.offset_mapping[limit - 1][0] :]


class FewStepInpaintPipeline(StableDiffusionXLInpaintPipeline):
    """SDXL inpainting for few-step distilled UNets with a 4-channel latent blend."""

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and pooled embeddings, one row per prompt (no classifier-free guidance)."""
        embeds, _, pooled, _ = self.encode_prompt(
            prompt=prompts,
            device=self._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled

    def prompt_window(self, prompt: str) -> PromptWindow:
        """What of ``prompt`` CLIP reads and what it ignores, tokenizing a bounded prefix (see :func:`prompt_window`).

        Both SDXL tokenizers split text the same way; the first decides.
        """
        return prompt_window(self.tokenizer if self.tokenizer is not None else self.tokenizer_2, prompt)

    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator], image_of: list[int]):
        """Scaled image latents per row: one VAE encode per input image, sampled per row's generator."""
        vae = self.vae
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        latents = []
        for gen, j in zip(generators, image_of, strict=True):
            mean, std = dist.mean[j : j + 1], dist.std[j : j + 1]
            latents.append(mean + std * randn_tensor(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype))
        return torch.cat(latents)

    @torch.inference_mode()
    def denoise(
        self, batch: DenoiseBatch, on_step: StepHook | None = None, unet: UNetCall | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Run the recipe; returns the final latents and which batch rows they belong to.

        Nothing in here reads a device value back to the host: every per-step number is a Python float
        of ``batch.sampler``, rows are picked with slices, and inputs arrive on the device already.
        """
        unet = unet or plain_call(self.unet)
        sampler, dtype = batch.sampler, batch.prompt_embeds.dtype
        n = len(batch.image_of)
        height, width = batch.images.shape[-2:]
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        generators = list(batch.generators)

        # 1. Image latents (one encode per input image) and noise, per row and generator.
        image_latents = self.encode_images(batch.images, generators, batch.image_of)
        image_latents = (image_latents.to(dtype) * self.vae.config.scaling_factor).to(dtype)
        shape = (n, self.vae.config.latent_channels, *latent_size)
        noise = randn_tensor(shape, generator=generators, device=image_latents.device, dtype=dtype)
        latents = sampler.start(image_latents, noise, batch.full_strength)

        # 2. Mask at latent resolution (nearest), per row; and what is kept outside it.
        masks = torch.nn.functional.interpolate(batch.masks, size=latent_size).to(dtype=dtype)
        mask = tensors.rows(masks, batch.image_of)
        keep = 1 - mask

        # 3. Conditioning.
        embeds, pooled, time_ids = batch.prompt_embeds, batch.pooled_embeds, batch.time_ids
        rows = list(range(n))
        previewed = frozenset(batch.preview_rows) if batch.on_preview is not None else frozenset()

        # 4. Denoise, blending the (re-noised) original latents back outside the mask after each step.
        for i in range(sampler.steps):
            noise_pred = unet(sampler.model_input(latents, i), sampler.timesteps[i], embeds, pooled, time_ids)
            if previewed:
                at = [k for k, row in enumerate(rows) if row in previewed]
                if at:
                    x0 = sampler.denoised(tensors.rows(noise_pred, at), tensors.rows(latents, at), i)
                    clean = tensors.rows(keep, at) * tensors.rows(image_latents, at) + tensors.rows(mask, at) * x0
                    assert batch.on_preview is not None
                    batch.on_preview(i, [rows[k] for k in at], StepPreview.capture(PROJECTION.to_rgb(clean)))
            latents = sampler.step(noise_pred, latents, i, generators)
            latents = keep * sampler.renoise(image_latents, noise, i) + mask * latents

            kept = on_step(i, sampler.steps) if on_step else None
            if kept is not None and len(kept) != len(rows):
                if not kept:
                    return latents[:0], []
                latents, noise, image_latents = (tensors.rows(t, kept) for t in (latents, noise, image_latents))
                mask, keep = tensors.rows(mask, kept), tensors.rows(keep, kept)
                embeds, pooled, time_ids = (tensors.rows(t, kept) for t in (embeds, pooled, time_ids))
                generators = [generators[k] for k in kept]
                rows = [rows[k] for k in kept]
        return latents, rows

    def time_ids(self, height: int, width: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's size conditioning for ``batch`` rows, built on the host (the caller stages it for the device)."""
        size = (height, width)
        ids, _ = self._get_add_time_ids(
            size,
            (0, 0),
            size,
            6.0,
            2.5,
            size,
            (0, 0),
            size,
            dtype=dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        )
        return ids.repeat(batch, 1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, list[bool]]:
        """VAE decode to [-1, 1] images (B, 3, H, W) and, per image, whether it is finite everywhere.

        A NaN/inf value is what an overflowing reduced-precision decode gives; a black image is a
        legitimate output (a night sky, a black wall) and is kept. ``upcast`` decodes in fp32 (the cure
        for an overflow) with a temporary fp32 copy of the VAE, eagerly: the shared VAE, its compiled
        graphs and its fused weights stay as they are. The usable flags are the one host read here.
        """
        vae = self.vae if not upcast or self.vae.dtype == torch.float32 else _fp32_copy(self.vae)
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        if vae is self.vae:
            image = vae.decode(scaled, return_dict=False)[0]
        else:
            with torch.compiler.set_stance("force_eager"):
                image = vae.decode(scaled, return_dict=False)[0]
        usable = torch.isfinite(image.flatten(1)).all(dim=1).tolist()
        return image, usable


def _fp32_copy(vae: AutoencoderKL) -> AutoencoderKL:
    """An fp32 copy of ``vae`` on its device, built from its weights (not its compiled module)."""
    with torch.device("meta"):
        copy = type(vae).from_config(vae.config)
    # A fused VAE's state also holds to_qkv/to_kv: the plain copy takes the separate weights it knows.
    state = {k: v.to(torch.float32) for k, v in vae.state_dict().items()}
    missing, _ = copy.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise RuntimeError(f"fp32 VAE copy: weights missing for {missing[:5]}")
    copy.use_tiling, copy.use_slicing = getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False)
    return copy.eval()
