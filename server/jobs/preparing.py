"""Preparing a queued job for the GPU before it is claimed: its row read, its inputs fetched (URLs, data URIs,
this server's files) and decoded by the engine's ``prepare`` in a thread, its batch key computed.

The worker runs one :meth:`JobPreparer.prepare` task per job at the head of the queue (its look-ahead) and
picks batches among the prepared ones; a failure becomes the job's error, written only if the job is
still queued when the worker gets to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from pipelines import Embedding, InpaintRequest
from pipelines.errors import EngineError, InputError
from pipelines.serving import ServingEngine

from ..inputs.input_fetch import InputFetcher, InputFetchError, image_size_of_json, slim_input
from .job import Job
from .leases import WorkSource
from .store import StoreUnavailable

log = logging.getLogger("inpaint-server.jobs")

STORE_RETRY_S = 1.0  # how often a job's row is read again while the store is unreachable


@dataclass
class Prepared:
    """One job made ready for a batch, or why it cannot run."""

    job: Job | None = None  # the job as loaded, its input slimmed once decoded
    prepared: Any = None  # the engine's PreparedRequest
    key: Any = None
    rows: int = 1  # image rows the job adds to a batch (its num_images)
    error: tuple[str, str, str | None] | None = None  # (error_type, message, field)


class JobPreparer:
    """Loads and prepares queued jobs for one worker; ``loaded`` holds the rows read so far (by job id)."""

    def __init__(self, source: WorkSource, fetcher: InputFetcher, max_image_pixels: int) -> None:
        self.source = source
        self.fetcher = fetcher
        self.max_image_pixels = max_image_pixels
        self.loaded: dict[str, Job] = {}

    def downloads(self, job_id: str) -> bool:
        """Whether preparing the job fetches a URL over the network (not only data URIs and this server's files)."""
        job = self.loaded.get(job_id)
        if job is None:
            return False
        data = job.input
        embeddings = [e.get("path") for e in data.get("embeddings") or [] if isinstance(e, dict)]
        return any(self.fetcher.is_remote(s) for s in (data.get("image_url"), data.get("mask_url"), *embeddings))

    async def prepare(self, engine: ServingEngine, job_id: str) -> Prepared:
        """Load the job, fetch and decode its inputs; never raises (a failure is the result's ``error``)."""
        started = time.perf_counter()
        job = await self._load(job_id)
        if job is None:
            return Prepared(error=("internal_error", "the request vanished from the store", None))
        self.loaded[job_id] = job
        try:
            request = await self.request(job)
            fetched = time.perf_counter()
            prepared = await asyncio.to_thread(engine.prepare, request)
            prepared.timings["fetch"] = fetched - started
            slim_input(job)
            return Prepared(job=job, prepared=prepared, key=engine.batch_key(prepared), rows=request.num_images)
        except InputFetchError as exc:
            return Prepared(job=job, error=(exc.error_type, exc.message, exc.field))
        except InputError as exc:
            return Prepared(job=job, error=("invalid_input", exc.message, exc.field))
        except EngineError as exc:
            return Prepared(job=job, error=(exc.error_type, str(exc), None))
        except Exception as exc:
            log.exception("preparing request %s failed", job.id)
            message = f"could not prepare the request ({type(exc).__name__})"
            return Prepared(job=job, error=("internal_error", message, None))

    async def _load(self, job_id: str) -> Job | None:
        """The job's row, read again every :data:`STORE_RETRY_S` while the store is unreachable: an outage delays
        the preparation, it never becomes the job's result (nor a task that fails every time it is asked)."""
        while True:
            try:
                return await asyncio.to_thread(self.source.load, job_id)
            except StoreUnavailable as exc:
                log.warning("request %s waits for the job store to prepare it: %s", job_id, exc)
                await asyncio.sleep(STORE_RETRY_S)

    async def request(self, job: Job) -> InpaintRequest:
        """The engine's request for a job: its inputs fetched (URLs, data URIs, this server's files)."""
        data = job.input
        image, mask = await asyncio.gather(
            self.fetcher.fetch(data["image_url"], "image_url"), self.fetcher.fetch(data["mask_url"], "mask_url")
        )
        embeddings = []
        for i, emb in enumerate(data.get("embeddings") or []):
            raw = await self.fetcher.fetch(emb["path"], f"embeddings.{i}.path")
            embeddings.append(Embedding(data=raw, tokens=list(emb.get("tokens") or ["<s0>", "<s1>"]), name=f"e{i}"))
        return InpaintRequest(
            app_id=job.app_id,
            image=image,
            mask=mask,
            prompt=data["prompt"],
            steps=int(data["num_inference_steps"]),
            strength=float(data["strength"]),
            seed=job.seed,
            num_images=int(data["num_images"]),
            image_size=image_size_of_json(data["image_size"]),
            embeddings=embeddings,
            enable_safety_checker=bool(data["enable_safety_checker"]),
            expand_prompt=bool(data["expand_prompt"]),
            request_id=job.id,
            max_image_pixels=self.max_image_pixels,
            previews=job.previews,
        )
