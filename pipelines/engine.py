"""The engine: the seam the server drives (``Engine.load``, ``prepare``, ``batch_key``, ``run``)."""

from __future__ import annotations

import functools
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from . import images as imgs
from . import tensors
from .embeddings import ParsedEmbedding, check_tokens_free, parse_embedding, textual_inversion
from .errors import EngineError, GpuFatalError, GpuOutOfMemory, InputError, NonFiniteOutputError, RequestCancelled
from .expansion import PromptExpander
from .fault_injection import FaultHook, FaultPoint, hook_from_env
from .gpu_faults import check_device, classify_gpu_error, first_line, free_memory, low_memory_vae
from .graphs import UNetCall, UNetGraphs
from .hub import EXPANSION_FILES, SAFETY_CHECKER_FILES, Resolver, check_model_files, model_parts, resolve_repo
from .inpaint import DenoiseBatch, FewStepInpaintPipeline, PromptWindow
from .loading import ModelStore
from .optimize import (
    BATCH_BUCKETS,
    SpeedOptions,
    batch_bucket,
    optimize_pipeline,
    set_attention_order,
    use_compile_cache,
)
from .previews import StepPreview
from .prompt_cache import PromptCache
from .safety import SafetyChecker
from .sampling import Sampler, build_sampler
from .schedules import make_scheduler, timesteps_for
from .specs import AppSpec, ServingSpec, VariantSpec
from .tensors import RequestTensors
from .types import InpaintRequest, InpaintResult

log = logging.getLogger(__name__)

MAX_IMAGES = 8
MAX_BATCH_ROWS = BATCH_BUCKETS[-1]  # image rows in one GPU batch: the largest compiled bucket
assert MAX_IMAGES <= MAX_BATCH_ROWS  # so one request always fits in one batch
MAX_SIDE = 14142  # fal's ImageSize bound
SEED_RANGE = 2**64
ShouldStop = Callable[[str], bool]
# on_progress(request_id, step, total), and a 4th argument, the step's StepPreview, for requests with previews.
OnProgress = Callable[..., None]


@dataclass
class PreparedRequest:
    """A request checked and decoded, ready for the GPU. Built by :meth:`Engine.prepare`."""

    request: InpaintRequest
    variant: VariantSpec
    strength: float
    seed: int
    timesteps: list[int]
    inputs: imgs.FittedInputs
    embedding: ParsedEmbedding | None
    nothing_to_paint: bool
    sampler: Sampler | None = None  # the schedule's numbers, computed on the host (None: nothing to paint)
    pixels: RequestTensors | None = None  # the inputs as staged uint8 tensors (None: nothing to paint)
    cut: str | None = None  # the prompt's part past CLIP's limit (unexpanded prompt), or None
    read: str | None = None  # a prefix of the prompt that encodes as the whole does (None: the whole prompt)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # for the result: what the user should know (a resized mask)

    @property
    def request_id(self) -> str:
        return self.request.request_id


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (no fp16 VAE overflow, full tensor-core rate); fp32 on CPU (fp16 is very slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    """Few-step SDXL inpainting for every loaded (app, steps) variant."""

    def __init__(
        self,
        spec: ServingSpec,
        store: ModelStore,
        variants: dict[tuple[str, int], VariantSpec],
        safety_checker: SafetyChecker | None,
        expander: PromptExpander | None,
        speed: SpeedOptions | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.variants = variants
        self.safety_checker = safety_checker
        self.expander = expander
        self.work_pixels = spec.engine.work_pixels
        self.speed = speed or SpeedOptions()
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache(0)
        self.max_batch_rows = MAX_BATCH_ROWS
        # Whole-UNet CUDA graphs per (UNet, batch shape), recorded by the warm-up (pipelines/graphs.py).
        self.graphs = UNetGraphs.for_device(store.device, self.speed.cuda_graphs)
        self._callers: dict[int, UNetCall] = {}
        # Strengths are arbitrary floats: the distinct schedules are bounded, not few.
        self._samplers = functools.lru_cache(maxsize=256)(self._build_sampler)
        self._sealed = False  # after the warm-up: runs never compile (seal_compiled_shapes)
        self._warming = False
        # prepare() (any thread) reads the tokenizers' vocabularies while run() may be adding an
        # embedding's tokens to them; both hold this lock for that part.
        self._vocab_lock = threading.Lock()
        # Tests only: called at named points of a run to provoke GPU faults (see fault_injection.py).
        self.fault_hook: FaultHook | None = hook_from_env()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        spec: ServingSpec,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        resolver: Resolver | None = None,
        variants: Iterable[tuple[str, int]] | None = None,
        safety_checker: bool = True,
        prompt_expansion: bool = True,
        speed: SpeedOptions | None = None,
        prompt_cache_size: int = 512,
    ) -> Engine:
        """Load weights for ``variants`` (``(app id or name, steps)``; default: every step count of every app).

        ``speed`` picks the levers of :mod:`pipelines.optimize` (default: all on CUDA, none on CPU);
        ``prompt_cache_size`` is how many prompts' text embeddings are kept (0: none).

        Raises :class:`~pipelines.errors.ModelFileError` naming the file and the command that fetches it
        when something is missing; nothing is kept from a failed load.
        """
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        speed = speed or SpeedOptions.for_device(device)
        if speed.compile and speed.cache_dir is not None:
            use_compile_cache(speed.cache_dir)  # before anything can compile
        if device.type == "cuda":
            log.info("attention backends, in order: %s", ", ".join(set_attention_order(speed.attention)))
        chosen: dict[tuple[str, int], VariantSpec] = {}
        wanted = (
            list(variants)
            if variants is not None
            else [(app.app_id, n) for app in spec.apps.values() for n in app.steps]
        )
        for app_ref, steps in wanted:
            app = spec.app(app_ref)
            if steps not in app.variants:
                raise InputError("num_inference_steps", f"{app.app_id} offers {list(app.steps)}, not {steps}")
            chosen[(app.app_id, steps)] = app.variants[steps]
        # Missing files fail here, all named at once, before any weight is read (not after retries offline).
        parts = model_parts(spec, chosen.values(), safety_checker, prompt_expansion)
        resolver = check_model_files(parts, resolver or Resolver())
        store = ModelStore(device, dtype, resolver)
        for variant in chosen.values():
            applied = optimize_pipeline(store.pipeline(variant, FewStepInpaintPipeline), speed)
            if applied:
                log.info("%s:%d: %s", variant.app_name, variant.steps, ", ".join(applied))
        checker = None
        if safety_checker:
            folder = resolve_repo(spec.engine.safety_checker, SAFETY_CHECKER_FILES, resolver, "safety_checker")
            checker = SafetyChecker(folder, device, dtype)
        expander = None
        if prompt_expansion:
            model = spec.engine.prompt_expansion.model
            folder = resolve_repo(model, EXPANSION_FILES, resolver, "prompt_expansion")
            expander = PromptExpander(folder, spec.engine.prompt_expansion, device)
        log.info("engine ready on %s (%s): %s", device, dtype, ", ".join(f"{a}:{n}" for a, n in chosen))
        return cls(spec, store, chosen, checker, expander, speed, PromptCache(prompt_cache_size))

    @property
    def device(self) -> torch.device:
        return self.store.device

    def seal_compiled_shapes(self) -> None:
        """After the warm-up: anything the warm-up did not compile (an odd shape the dynamic graphs do not
        cover, VAE tiles) runs eagerly instead of compiling inside a request (and instead of failing once
        torch's recompile limit is reached). No-op unless compiling.

        The stance is this engine's, applied around each of its runs (torch's is process-wide): another
        engine in the same process (the benchmark's lever sweep, tests) still compiles its warm-up."""
        if self.speed.compile:
            self._sealed = True
            log.info("compiled shapes sealed: new shapes run eagerly")

    def _stance(self) -> Any:
        """Around a run: no compiling once sealed, unless this run is part of the warm-up."""
        if self.speed.compile and self._sealed and not self._warming:
            return torch.compiler.set_stance("eager_on_recompile")
        return nullcontext()

    @contextmanager
    def warming(self) -> Iterator[None]:
        """The warm-up's context: compiling is allowed (even after sealing) and CUDA graphs are recorded.

        Runs on the GPU thread only, between batches, so no request ever runs inside it.
        """
        stance = torch.compiler.set_stance("default") if self.speed.compile else nullcontext()
        self._warming = True
        try:
            with stance, self.graphs.recording_allowed():
                yield
        finally:
            self._warming = False

    def _unet_call(self, pipe: FewStepInpaintPipeline) -> UNetCall | None:
        """The denoising loop's UNet call: through recorded CUDA graphs when they are on, else direct."""
        if not self.graphs.enabled:
            return None
        key = id(pipe.unet)
        if key not in self._callers:
            self._callers[key] = self.graphs.caller(pipe.unet)
        return self._callers[key]

    def pipeline(self, variant: VariantSpec) -> FewStepInpaintPipeline:
        return self.store.pipeline(variant, FewStepInpaintPipeline)

    # ------------------------------------------------------------------ requests

    def app(self, app_id: str) -> AppSpec:
        try:
            return self.spec.app(app_id)
        except EngineError as exc:
            raise InputError("app_id", str(exc)) from exc

    def prepare(self, request: InpaintRequest) -> PreparedRequest:
        """Validate and decode one request (CPU work, safe to run off the GPU thread).

        Raises :class:`InputError` naming the offending field.
        """
        started = time.perf_counter()
        app = self.app(request.app_id)
        steps = app.default_steps if request.steps is None else request.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps not in app.variants:
            raise InputError("num_inference_steps", f"must be one of {list(app.steps)} for {app.app_id}, got {steps!r}")
        variant = self.variants.get((app.app_id, steps))
        if variant is None:
            loaded = sorted(n for a, n in self.variants if a == app.app_id)
            raise InputError("num_inference_steps", f"{steps} steps are not loaded on this server (loaded: {loaded})")
        strength = app.default_strength if request.strength is None else float(request.strength)
        timesteps = timesteps_for(variant, strength, self.store.scheduler_config(variant.base))
        n = request.num_images
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            raise InputError("num_images", f"must be an integer from 1 to {MAX_IMAGES}, got {n!r}")
        seed = request.seed
        if seed is None:
            seed = secrets.randbelow(2**32)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise InputError("seed", f"must be a 64-bit integer, got {seed!r}")
        if request.image_size is not None:
            w, h = request.image_size
            if not all(isinstance(v, int) and 0 < v <= MAX_SIDE for v in (w, h)):
                raise InputError("image_size", f"width and height must be integers in 1..{MAX_SIDE}, got {w}x{h}")
        _check_text("prompt", request.prompt)
        embedding = None
        if len(request.embeddings) > 1:
            raise InputError("embeddings", "at most one embedding per request is supported")
        if request.embeddings:
            for i, token in enumerate(request.embeddings[0].tokens):
                _check_text(f"embeddings.0.tokens.{i}", token)
            text = self.store.text_stack(variant.base)
            embedding = parse_embedding(
                request.embeddings[0], text.text_encoder.config.hidden_size, text.text_encoder_2.config.hidden_size
            )
            with self._vocab_lock:
                check_tokens_free(embedding, (text.tokenizer, text.tokenizer_2))
        max_pixels = request.max_image_pixels or imgs.MAX_IMAGE_PIXELS
        image = imgs.to_rgb(imgs.open_image(request.image, "image_url", max_pixels))
        mask = imgs.to_mask(imgs.open_image(request.mask, "mask_url", max_pixels))
        fitted = imgs.fit(image, mask, request.image_size, self.work_pixels)
        nothing_to_paint = not imgs.binarize(fitted.mask).any()
        warnings = [_mask_resized(mask.size, image.size)] if mask.size != image.size else []
        prepared = PreparedRequest(
            request=request,
            variant=variant,
            strength=strength,
            seed=seed,
            timesteps=timesteps,
            inputs=fitted,
            embedding=embedding,
            nothing_to_paint=nothing_to_paint,
            warnings=warnings,
        )
        if not nothing_to_paint:
            prepared.sampler = self._sampler(variant, timesteps)
            prepared.pixels = RequestTensors.from_inputs(fitted, self.device)
            window = self._window(variant, request.prompt)  # an expanded prompt's is found on the GPU thread
            prepared.cut = window.ignored
            # An embedding's tokens are not in the vocabulary yet: they tokenize otherwise once added.
            prepared.read = window.read if embedding is None else None
        prepared.timings["prepare"] = time.perf_counter() - started
        return prepared

    def _sampler(self, variant: VariantSpec, timesteps: list[int]) -> Sampler:
        """The batch's sampler; built once per (variant, timesteps) (~1 ms of scheduler set-up each time
        otherwise, with the GIL held against the GPU thread), and immutable, so shared by every request."""
        return self._samplers(variant, tuple(timesteps))

    def _build_sampler(self, variant: VariantSpec, timesteps: tuple[int, ...]) -> Sampler:
        scheduler = make_scheduler(variant, self.store.scheduler_config(variant.base))
        return build_sampler(scheduler, list(timesteps), self.store.dtype, variant.eta)

    def _window(self, variant: VariantSpec, prompt: str) -> PromptWindow:
        with self._vocab_lock:  # the vocabulary may be growing (a textual inversion on the GPU thread)
            return self.pipeline(variant).prompt_window(prompt)

    def batch_key(self, request: InpaintRequest | PreparedRequest) -> Hashable:
        """Requests with equal keys can share one UNet batch (same weights, timesteps and working size)."""
        p = request if isinstance(request, PreparedRequest) else self.prepare(request)
        solo = id(p) if p.embedding is not None or p.nothing_to_paint else None
        return (p.variant.app_id, p.variant.steps, tuple(p.timesteps), p.inputs.work_size, solo)

    @torch.inference_mode()
    def run(
        self,
        requests: Sequence[InpaintRequest | PreparedRequest],
        should_stop: ShouldStop | None = None,
        on_progress: OnProgress | None = None,
    ) -> list[InpaintResult]:
        """Run requests (grouped by batch key), one result per request in order.

        Requests with equal batch keys run together, in batches of at most ``max_batch_rows`` image rows
        (``num_images`` summed; 8, the largest compiled bucket): more rows are split into several batches,
        never into a shape the warm-up did not build. A bad or cancelled request gets a result with
        ``error`` set; the others are unaffected. Out of
        GPU memory, a batch is run again one request at a time, then a request alone in low-memory mode
        (VAE tiling); one that still does not fit gets a :class:`GpuOutOfMemory` result (see
        :meth:`_run_fitting`). Exceptions escape only for faults of the whole process or batch:
        :class:`GpuFatalError` when the CUDA context is broken (the caller must restart the process),
        or an unexpected bug.

        Everything runs under ``torch.inference_mode()``: no autograd graph is ever recorded, so nothing
        a result or the prompt cache keeps holds activations alive.
        """
        with self._stance():
            return self._run(requests, should_stop, on_progress)

    def _run(
        self,
        requests: Sequence[InpaintRequest | PreparedRequest],
        should_stop: ShouldStop | None,
        on_progress: OnProgress | None,
    ) -> list[InpaintResult]:
        results: list[InpaintResult | None] = [None] * len(requests)
        groups: dict[Hashable, list[tuple[int, PreparedRequest]]] = {}
        for i, req in enumerate(requests):
            try:
                prepared = req if isinstance(req, PreparedRequest) else self.prepare(req)
            except InputError as exc:
                results[i] = InpaintResult(request_id=req.request_id, error=exc)
                continue
            groups.setdefault(self.batch_key(prepared), []).append((i, prepared))
        for members in groups.values():
            for chunk in chunk_by_rows(members, self.max_batch_rows):
                batch = [p for _, p in chunk]
                try:
                    chunk_results = self._run_fitting(batch, should_stop, on_progress)
                except InputError as exc:  # e.g. an embedding refused while loading; nothing stays loaded
                    chunk_results = [InpaintResult(request_id=p.request_id, seed=p.seed, error=exc) for p in batch]
                for (i, _), result in zip(chunk, chunk_results, strict=True):
                    results[i] = result
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ GPU memory faults

    # The OOM policy lives here, not in the server: only the engine can shrink the work (split a batch,
    # tile the VAE) and keep what did fit, and the server knows nothing of torch. The order follows
    # what costs memory: the UNet and the VAE decode grow with the batch, then the VAE decode with the
    # image size. Each step frees memory first; each retry gives the same images as a run without
    # faults (one generator per image), except for VAE tile seams in low-memory mode.

    def _run_fitting(
        self, group: list[PreparedRequest], should_stop: ShouldStop | None, on_progress: OnProgress | None
    ) -> list[InpaintResult]:
        results = self._attempt(group, should_stop, on_progress)
        if results is not None:
            return results
        if len(group) > 1:
            log.warning("retrying a batch of %d requests one request at a time", len(group))
        return [self._run_alone(p, should_stop, on_progress, tried=len(group) == 1) for p in group]

    def _run_alone(
        self, p: PreparedRequest, should_stop: ShouldStop | None, on_progress: OnProgress | None, tried: bool
    ) -> InpaintResult:
        if not tried:
            results = self._attempt([p], should_stop, on_progress)
            if results is not None:
                return results[0]
        log.warning("request %s: retrying alone with VAE tiling", p.request_id)
        results = self._attempt([p], should_stop, on_progress, low_memory=True)
        if results is not None:
            return results[0]
        self._check_device(p)
        return InpaintResult(
            request_id=p.request_id,
            seed=p.seed,
            prompt=p.request.prompt,
            timings=_round(p.timings),
            error=GpuOutOfMemory(
                "out of GPU memory, even alone and with VAE tiling; try a smaller image_size or fewer num_images"
            ),
        )

    def _attempt(
        self,
        group: list[PreparedRequest],
        should_stop: ShouldStop | None,
        on_progress: OnProgress | None,
        low_memory: bool = False,
    ) -> list[InpaintResult] | None:
        """One try: the results, or None if the GPU ran out of memory (the memory is freed again).

        A fatal CUDA error becomes :class:`GpuFatalError`; other errors pass through unchanged.
        """
        vae = self.pipeline(group[0].variant).vae
        # VAE tiling/slicing reuses decoder outputs across calls, which CUDA graphs overwrite: eager.
        eager = torch.compiler.set_stance("force_eager") if low_memory and self.speed.compile else nullcontext()
        try:
            with low_memory_vae(vae) if low_memory else nullcontext(), eager:
                return self._run_group(group, should_stop, on_progress)
        except Exception as exc:
            kind = classify_gpu_error(exc)
            if kind == "fatal":
                raise GpuFatalError(f"unrecoverable GPU error: {first_line(exc)}") from exc
            if kind != "oom":
                raise
            mode = " with VAE tiling" if low_memory else ""
            log.warning("out of GPU memory on %d request(s)%s: %s", len(group), mode, first_line(exc))
        # Out of the except block: the traceback, and the tensors its frames hold, are gone.
        free_memory(self.device)
        return None

    def _check_device(self, p: PreparedRequest) -> None:
        """After an OOM that could not be worked around: is the device still sound? GpuFatalError if not."""
        try:
            self._fault_point("device_check", [p], self.pipeline(p.variant))
            check_device(self.device)
        except Exception as exc:
            raise GpuFatalError(f"GPU self-check after running out of memory failed: {first_line(exc)}") from exc

    def _fault_point(
        self, name: str, group: list[PreparedRequest], pipe: FewStepInpaintPipeline, step: int | None = None
    ) -> None:
        hook = self.fault_hook
        if hook is not None:
            ids = tuple(p.request_id for p in group)
            prompts = tuple(p.request.prompt for p in group)
            hook(FaultPoint(name, ids, prompts, bool(getattr(pipe.vae, "use_tiling", False)), step))

    # ------------------------------------------------------------------ internals

    def _passthrough(self, p: PreparedRequest) -> InpaintResult:
        """An all-black mask: nothing to repaint, so the (resized) input is the answer; no UNet runs."""
        n = p.request.num_images
        return InpaintResult(
            request_id=p.request_id,
            images=[p.inputs.image.copy() for _ in range(n)],
            has_nsfw_concepts=[False] * n,
            seed=p.seed,
            prompt=p.request.prompt,
            timings=_round({**p.timings, "inference": 0.0}),
            warnings=list(p.warnings),
        )

    def _run_group(
        self, group: list[PreparedRequest], should_stop: ShouldStop | None, on_progress: OnProgress | None
    ) -> list[InpaintResult]:
        """One batch, in the order of the recipe (each stage a method below)."""
        if all(p.nothing_to_paint for p in group):
            return [self._passthrough(p) for p in group]
        pipe = self.pipeline(group[0].variant)
        clock = StageClock(self.device)
        prompts, texts, cut = self._expand_prompts(group, clock)  # 1. prompts (expanded with the seed when asked)
        batch = self._batch(group, pipe, texts)  # 2. text encoding, inputs to the device, padding
        clock.mark("text_encoding")
        latents, rows, cancelled = self._denoise(group, pipe, batch, should_stop, on_progress)  # 3. denoise
        clock.mark("inference")
        decoded = self._decode(group, pipe, batch, latents, rows, cancelled)  # 4. decode, NaN/inf check
        clock.mark("decode")
        outputs = self._composite(group, decoded)  # 5. composite onto the exact input pixels, on the device
        clock.mark("postprocess")
        flags = self._check_safety(group, outputs, decoded.bad | cancelled)  # 6. safety checker
        if flags:
            clock.mark("safety_checker")
        images = {j: tensors.to_pil(out.cpu()) for j, out in outputs.items()}  # 7. only uint8 comes back
        timings = clock.result()
        return [
            self._result(j, p, prompt, cut[j], images.get(j), flags.get(j), decoded, cancelled, timings)
            for j, (p, prompt) in enumerate(zip(group, prompts, strict=True))
        ]

    def _expand_prompts(
        self, group: list[PreparedRequest], clock: StageClock
    ) -> tuple[list[str], list[str], list[str | None]]:
        """The prompts the batch runs; for each, the text to encode (no more than CLIP reads, up to a word) and
        the part CLIP cannot see (computed in ``prepare`` unless the prompt was expanded here). A prompt that
        already fills CLIP's window is not expanded: CLIP would not read the addition (and the expansion model's
        own context is only so long)."""
        prompts, cut = [p.request.prompt for p in group], [p.cut for p in group]
        texts = [p.request.prompt if p.read is None else p.read for p in group]
        for j, p in enumerate(group):
            if _expands(p) and self.expander is not None:
                prompts[j] = self.expander.expand(p.request.prompt, p.seed)
                window = self._window(p.variant, prompts[j])
                texts[j], cut[j] = window.read if p.embedding is None else prompts[j], window.ignored
        if any(_expands(p) for p in group):
            clock.mark("prompt_expansion")
        return prompts, texts, cut

    def _batch(self, group: list[PreparedRequest], pipe: FewStepInpaintPipeline, texts: list[str]) -> DenoiseBatch:
        """The UNet batch: one row per output image, padded to a compiled bucket; one input image per request."""
        rows = [(j, p.request.num_images) for j, p in enumerate(group)]
        per_row = [text for (j, n), text in zip(rows, texts, strict=True) for _ in range(n)]
        embedding = group[0].embedding if len(group) == 1 else None
        with self._vocab_lock, textual_inversion(pipe, embedding):
            if embedding is None:  # an embedding's tokens mean something else: never cached
                text_key = (id(pipe.text_encoder), id(pipe.text_encoder_2))
                embeds, pooled = self.prompt_cache.encode(text_key, per_row, pipe.encode_prompts)
            else:
                embeds, pooled = pipe.encode_prompts(per_row)
        image_of = [j for j, n in rows for _ in range(n)]
        generators = [
            torch.Generator(device=self.device).manual_seed((p.seed + k) % SEED_RANGE)
            for p in group
            for k in range(p.request.num_images)
        ]
        preview_rows = tuple(k for k, j in enumerate(image_of) if group[j].request.previews)
        if self.speed.pads_batches:
            # Compiled UNet graphs exist per batch bucket: padding rows repeat the last real row, each with
            # noise of its own; they are never decoded. The VAE sees only the real input images.
            extra = batch_bucket(len(image_of)) - len(image_of)
            embeds, pooled = _repeat_last(embeds, extra), _repeat_last(pooled, extra)
            image_of = image_of + [image_of[-1]] * extra
            generators = generators + [torch.Generator(device=self.device).manual_seed(k) for k in range(extra)]
        images = torch.stack([tensors.to_device(p.pixels.work_image, self.device) for p in group])
        masks = torch.stack([tensors.to_device(p.pixels.work_mask, self.device) for p in group])
        height, width = images.shape[-2:]
        time_ids = pipe.time_ids(height, width, len(image_of), self.store.dtype)
        return DenoiseBatch(
            prompt_embeds=embeds,
            pooled_embeds=pooled,
            time_ids=tensors.to_device(time_ids, self.device),
            images=tensors.normalize(images, self.store.dtype),
            masks=masks.to(torch.float32),
            image_of=image_of,
            generators=generators,
            sampler=group[0].sampler,
            full_strength=group[0].strength == 1.0,
            preview_rows=preview_rows,
        )

    def _denoise(
        self,
        group: list[PreparedRequest],
        pipe: FewStepInpaintPipeline,
        batch: DenoiseBatch,
        should_stop: ShouldStop | None,
        on_progress: OnProgress | None,
    ) -> tuple[torch.Tensor, list[int], set[int]]:
        """The denoising loop; returns the latents, the batch rows they belong to and the cancelled requests."""
        image_of = batch.image_of
        cancelled: set[int] = set()  # indices into group
        live = list(range(len(image_of)))
        previews: dict[int, StepPreview] = {}  # this step's preview per request (index into group)

        def on_preview(i: int, rows: list[int], preview: StepPreview) -> None:
            for j in sorted({image_of[row] for row in rows}):
                mine = [n for n, row in enumerate(rows) if image_of[row] == j]  # contiguous: a request's rows are
                previews[j] = preview.rows(mine[0], mine[-1] + 1)

        def on_step(i: int, total: int) -> list[int] | None:
            nonlocal live
            self._fault_point("denoise_step", group, pipe, i)
            active = sorted({image_of[row] for row in live})
            if on_progress is not None:
                for j in active:
                    preview = previews.pop(j, None)
                    if preview is None:
                        on_progress(group[j].request_id, i + 1, total)
                    else:
                        on_progress(group[j].request_id, i + 1, total, preview)
            previews.clear()
            if should_stop is None or i == total - 1:
                return None
            cancelled.update(j for j in active if should_stop(group[j].request_id))
            keep = [k for k, row in enumerate(live) if image_of[row] not in cancelled]
            if keep and self.speed.pads_batches and len(keep) < len(live):
                return None  # a fixed-shape (compiled) batch runs on; the cancelled rows are dropped at the end
            live = [live[k] for k in keep]
            return keep

        if batch.preview_rows and on_progress is not None:
            batch.on_preview = on_preview
        latents, rows = pipe.denoise(batch, on_step, self._unet_call(pipe))
        return latents, rows, cancelled

    def _decode(
        self,
        group: list[PreparedRequest],
        pipe: FewStepInpaintPipeline,
        batch: DenoiseBatch,
        latents: torch.Tensor,
        rows: list[int],
        cancelled: set[int],
    ) -> Decoded:
        """VAE-decode the real rows of requests still wanted (no padding, nothing cancelled); a row with
        NaN/inf values is decoded again in fp32; requests with a row that stays non-finite are ``bad``."""
        real_rows = sum(p.request.num_images for p in group)
        wanted = [k for k, row in enumerate(rows) if row < real_rows and batch.image_of[row] not in cancelled]
        decoded = Decoded(rows=[batch.image_of[rows[k]] for k in wanted])
        if not wanted:
            return decoded
        self._fault_point("decode", group, pipe)
        images, usable = pipe.decode(tensors.rows(latents, wanted))
        retry = [n for n, ok in enumerate(usable) if not ok]
        if retry:  # NaN/inf: decode those rows again in fp32 before giving up on them
            log.warning("VAE decode: NaN/inf values in %d image(s); decoding again in fp32", len(retry))
            again, usable_again = pipe.decode(tensors.rows(latents, [wanted[n] for n in retry]), upcast=True)
            for m, n in enumerate(retry):
                if usable_again[m]:
                    images[n], usable[n] = again[m].to(images.dtype), True
                    decoded.redecoded.add(decoded.rows[n])
        decoded.bad = {j for j, ok in zip(decoded.rows, usable, strict=True) if not ok}
        decoded.images = tensors.decoded_to_unit(images)
        return decoded

    def _composite(self, group: list[PreparedRequest], decoded: Decoded) -> dict[int, torch.Tensor]:
        """Per request with images: (n, 3, H, W) uint8 on the device, generated pixels inside the binarised mask
        (resized to the output size first) and the input's exact pixels outside it."""
        outputs = {}
        for j, p in enumerate(group):
            mine = [k for k, row in enumerate(decoded.rows) if row == j]
            if not mine or j in decoded.bad:
                continue
            assert decoded.images is not None and p.pixels is not None
            generated = tensors.quantize(tensors.resize(tensors.rows(decoded.images, mine), p.inputs.output_size))
            reference = tensors.to_device(p.pixels.out_image, self.device)
            mask = tensors.to_device(p.pixels.out_mask, self.device)
            outputs[j] = tensors.composite(generated, reference, mask)
        return outputs

    def _check_safety(
        self, group: list[PreparedRequest], outputs: dict[int, torch.Tensor], skip: set[int]
    ) -> dict[int, list[bool]]:
        """Flags for the requests that asked for the checker, on what the user would receive (on the device)."""
        to_check = [j for j in outputs if group[j].request.enable_safety_checker and j not in skip]
        if self.safety_checker is None or not to_check:
            return {}
        verdicts = iter(self.safety_checker.check(torch.cat([outputs[j] for j in to_check])))
        return {j: [next(verdicts) for _ in range(len(outputs[j]))] for j in to_check}

    def _result(
        self,
        j: int,
        p: PreparedRequest,
        prompt: str,
        cut: str | None,
        images: list[Image.Image] | None,
        flags: list[bool] | None,
        decoded: Decoded,
        cancelled: set[int],
        timings: dict[str, float],
    ) -> InpaintResult:
        result = InpaintResult(
            request_id=p.request_id,
            seed=p.seed,
            prompt=prompt,
            timings=_round({**p.timings, **timings}),
            warnings=list(p.warnings),
        )
        if j in decoded.redecoded:
            result.warnings.append("The VAE decode overflowed in reduced precision; the image was decoded in fp32")
        if p.request.expand_prompt and not _expands(p):
            result.warnings.append("The prompt already fills CLIP's window, so it was not expanded (expand_prompt)")
        if cut:
            limit = self.pipeline(p.variant).tokenizer.model_max_length
            result.warnings.append(
                f"The prompt is longer than CLIP's {limit} tokens; this part was ignored: {_clip(cut)!r}"
            )
        if j in cancelled:
            result.error = RequestCancelled(f"request {p.request_id} was cancelled")
        elif j in decoded.bad or images is None:
            result.error = NonFiniteOutputError(
                "the VAE decode produced NaN/inf values, also in fp32; no image was returned"
            )
        else:
            flags = flags or [False] * len(images)
            result.images = [SafetyChecker.blacken(im) if flag else im for im, flag in zip(images, flags, strict=True)]
            result.has_nsfw_concepts = flags
        return result


@dataclass
class Decoded:
    """What the VAE decode gave: ``images`` ([0, 1] float, one per decoded row) and the request of each row."""

    rows: list[int]  # request index (into the batch's group) of each decoded image
    images: torch.Tensor | None = None
    bad: set[int] = field(default_factory=set)  # requests with an image that stayed non-finite
    redecoded: set[int] = field(default_factory=set)  # requests with an image that needed the fp32 decode


class StageClock:
    """Stage durations without host syncs: CUDA events on the GPU (read once, at the end), the wall clock
    on the CPU. ``mark(name)`` ends stage ``name``, which began at the previous mark (or the start)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, Any]] = [("", self._now())]

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def result(self) -> dict[str, float]:
        """Seconds per stage (waits for the last event on CUDA)."""
        if self.cuda:
            self._marks[-1][1].synchronize()
        spans = {}
        for (_, start), (name, end) in itertools.pairwise(self._marks):
            spans[name] = start.elapsed_time(end) / 1000 if self.cuda else end - start
        return spans


def chunk_by_rows(members: list[tuple[int, PreparedRequest]], limit: int) -> list[list[tuple[int, PreparedRequest]]]:
    """Split requests (in order) into batches of at most ``limit`` image rows. A request is never split:
    ``num_images`` is at most ``MAX_IMAGES``, which is the largest batch bucket."""
    chunks: list[list[tuple[int, PreparedRequest]]] = []
    rows = 0
    for member in members:
        n = member[1].request.num_images
        if not chunks or rows + n > limit:
            chunks.append([])
            rows = 0
        chunks[-1].append(member)
        rows += n
    return chunks


def _repeat_last(rows: torch.Tensor, extra: int) -> torch.Tensor:
    """``rows`` with its last row repeated ``extra`` more times (padding a batch to its bucket)."""
    return torch.cat([rows, rows[-1:].expand(extra, *rows.shape[1:])]) if extra else rows


def _expands(p: PreparedRequest) -> bool:
    """Whether the request's prompt is expanded: asked for, and CLIP would read some of the addition."""
    return p.request.expand_prompt and p.cut is None


def _check_text(field: str, text: Any) -> None:
    """Text a tokenizer can take: a string without unpaired UTF-16 surrogates (``"\\ud800"`` in JSON)."""
    if not isinstance(text, str):
        raise InputError(field, "must be a string")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                field, f"contains an unpaired UTF-16 surrogate at character {exc.start}; send valid Unicode text"
            ) from None


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _round(timings: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in timings.items()}


def _mask_resized(mask: tuple[int, int], image: tuple[int, int]) -> str:
    """The warning for a mask of another size than its image, which is stretched to it as fal does."""
    return (
        f"The mask is {mask[0]}x{mask[1]} but the image is {image[0]}x{image[1]}: "
        f"the mask was resized to {image[0]}x{image[1]} (stretched, nearest neighbour)"
    )
