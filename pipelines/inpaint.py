"""The few-step latent-blend inpainting recipe on top of diffusers' SDXL inpaint pipeline.

It reuses the stock pipeline's helpers (prompt encoding, time ids, image and mask processors) and
replaces its ``__call__`` with a batch-oriented recipe that:

* runs exactly the given timesteps (strength is applied by choosing them, see ``schedules.py``);
* takes one prompt, image, mask and generator per output image, so requests with different
  prompts and seeds share one UNet batch and image k of a request does not depend on its batch;
* VAE-encodes each input image once (the stock pipeline encodes once per output image and once more
  for the masked image, which a 4-channel UNet never reads);
* lets the caller drop images between steps (cancellation) and report progress.

With one request, strength 1.0 and the same timesteps and generators, its latents equal the stock
pipeline's (tests/pipelines/test_parity.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

# Called after step i (0-based) with the number of steps; returns the indices (into the current
# batch) of the images to keep going, or None to keep all.
StepHook = Callable[[int, int], "list[int] | None"]


@dataclass
class DenoiseBatch:
    """Per-image tensors for one UNet batch. ``image_of[k]`` is the input image index of output k."""

    prompt_embeds: torch.Tensor  # (B, 77, D)
    pooled_embeds: torch.Tensor  # (B, P)
    images: torch.Tensor  # (R, 3, H, W) in [-1, 1], one per input image
    masks: torch.Tensor  # (R, 1, H, W) in {0, 1}, 1 = repaint
    image_of: list[int]  # len B
    generators: list[torch.Generator]  # len B
    strength: float


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

    def truncated_text(self, prompt: str) -> str | None:
        """The part of ``prompt`` CLIP cannot see (past ``model_max_length`` tokens), or None.

        ``encode_prompt`` truncates silently apart from a library log line; this computes the same
        cut (as diffusers does: the tokens between the limit and the end-of-text token) so it can be
        reported to the user. Both SDXL tokenizers split text the same way; the first decides.
        """
        tokenizer = self.tokenizer if self.tokenizer is not None else self.tokenizer_2
        limit = tokenizer.model_max_length
        try:
            encoded = tokenizer(prompt, truncation=False, add_special_tokens=True, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer: no offsets, so decode the tokens instead
            ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
            return tokenizer.decode(ids[limit - 1 : -1]) if len(ids) > limit else None
        if len(encoded.input_ids) <= limit:
            return None
        # The last slot holds the end-of-text token, so the first token CLIP drops is at limit - 1;
        # its character offset gives the ignored text as the user wrote it.
        return prompt[encoded.offset_mapping[limit - 1][0] :].strip()

    def _time_ids(self, height: int, width: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
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
        return ids.repeat(batch, 1).to(self._execution_device)

    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator], image_of: list[int]):
        """Scaled image latents per output image: one VAE encode per input image, sampled per generator."""
        vae = self.vae
        dist = vae.encode(images.to(device=self._execution_device, dtype=vae.dtype)).latent_dist
        rows = []
        for gen, j in zip(generators, image_of, strict=True):
            mean, std = dist.mean[j : j + 1], dist.std[j : j + 1]
            rows.append(mean + std * randn_tensor(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype))
        return torch.cat(rows)

    @torch.no_grad()
    def denoise(
        self,
        batch: DenoiseBatch,
        scheduler,
        timesteps: list[int],
        eta: float | None = None,
        on_step: StepHook | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Run the recipe; returns the final latents and which batch rows they belong to."""
        device = self._execution_device
        dtype = batch.prompt_embeds.dtype
        n = len(batch.image_of)
        height, width = batch.images.shape[-2:]
        latent_shape = (
            1,
            self.vae.config.latent_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        generators = list(batch.generators)

        # 1. Timesteps, exactly as given.
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        ts = scheduler.timesteps

        # 2. Image latents (one encode per input image) and noise, per output image and generator.
        image_latents = self.encode_images(batch.images, generators, batch.image_of)
        image_latents = (image_latents.to(dtype) * self.vae.config.scaling_factor).to(dtype)
        noise = randn_tensor((n, *latent_shape[1:]), generator=generators, device=device, dtype=dtype)
        if batch.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, ts[:1].repeat(n))

        # 3. Mask at latent resolution (nearest), per output image.
        index = torch.tensor(batch.image_of, device=device)
        masks = torch.nn.functional.interpolate(batch.masks.to(device), size=latent_shape[-2:])
        mask = masks.to(dtype=dtype)[index]

        # 4. Conditioning.
        prompt_embeds = batch.prompt_embeds.to(device)
        pooled = batch.pooled_embeds.to(device)
        time_ids = self._time_ids(height, width, n, dtype)
        step_params = set(inspect.signature(scheduler.step).parameters)
        extra = {}
        if "generator" in step_params:
            extra["generator"] = generators
        if eta is not None and "eta" in step_params:
            extra["eta"] = eta
        rows = list(range(n))

        # 5. Denoise, blending the (re-noised) original latents back outside the mask after each step.
        for i, t in enumerate(ts):
            model_input = scheduler.scale_model_input(latents, t)
            noise_pred = self.unet(
                model_input,
                t,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False,
            )[0]
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            proper = image_latents
            if i < len(ts) - 1:
                # A slice, not torch.tensor([ts[i + 1]]): that reads the value to the host, a sync
                # that would stall the GPU between two UNet calls.
                proper = scheduler.add_noise(image_latents, noise, ts[i + 1 : i + 2])
            latents = (1 - mask) * proper + mask * latents

            keep = on_step(i, len(ts)) if on_step else None
            if keep is not None and len(keep) != len(rows):
                if not keep:
                    return latents[:0], []
                sel = torch.tensor(keep, device=device)
                latents, noise, image_latents, mask = latents[sel], noise[sel], image_latents[sel], mask[sel]
                prompt_embeds, pooled, time_ids = prompt_embeds[sel], pooled[sel], time_ids[sel]
                generators = [generators[k] for k in keep]
                if "generator" in extra:
                    extra["generator"] = generators
                rows = [rows[k] for k in keep]
        return latents, rows

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, list[bool]]:
        """VAE decode to [0, 1] images (B, 3, H, W) and, per image, whether it is usable.

        Unusable means a NaN/inf value anywhere, or a frame that is black everywhere (what an
        overflowing half-precision decode turns into once clamped). ``upcast`` decodes in fp32 (the
        cure for a half-precision overflow) with a temporary fp32 copy of the VAE, eagerly: the
        shared VAE, its compiled graphs and its fused weights stay as they are.
        """
        vae = self.vae if not upcast or self.vae.dtype == torch.float32 else _fp32_copy(self.vae)
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        if vae is self.vae:
            image = vae.decode(scaled, return_dict=False)[0]
        else:
            with torch.compiler.set_stance("force_eager"):
                image = vae.decode(scaled, return_dict=False)[0]
        flat = image.flatten(1)
        # Black after the [-1, 1] -> [0, 255] conversion: every value below half a grey level.
        lit = (flat.float() >= -1 + 1 / 255).any(dim=1)
        usable = (torch.isfinite(flat).all(dim=1) & lit).tolist()
        return (image.float() / 2 + 0.5).clamp(0, 1), usable


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
