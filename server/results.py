"""Model outputs: encoding a result's images (files or data URIs) and holding sync_mode results in memory."""

from __future__ import annotations

import base64
import logging
from collections import OrderedDict
from typing import Any

from pipelines.encode import CONTENT_TYPES, encode_image

from .files import FileStore
from .jobs import Job

log = logging.getLogger("inpaint-server.jobs")

INLINE_BUDGET = 256 * 1024 * 1024  # bytes of sync_mode results (data URIs) held in memory at most


def encode_output(job: Job, result: Any, files: FileStore) -> dict[str, Any]:
    """fal's output JSON for an engine result. Files are written under the data dir, or (``sync_mode``)
    the images are inlined as data URIs and nothing touches the disk. Runs off the event loop."""
    fmt = job.input.get("format", "jpeg")
    images = []
    for k, image in enumerate(result.images):
        data = encode_image(image, fmt)
        name = f"{k}.{fmt}"
        if job.sync_mode:
            url = f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(data).decode()}"
        else:
            files.write_result(job.id, name, data)
            job.files.append(name)
            url = f"{job.base_url}/files/{job.id}/{name}"
        images.append(
            {
                "url": url,
                "content_type": CONTENT_TYPES[fmt],
                "file_name": name,
                "file_size": len(data),
                "width": image.width,
                "height": image.height,
            }
        )
    return {
        "images": images,
        "timings": result.timings,
        "seed": result.seed,
        "has_nsfw_concepts": result.has_nsfw_concepts,
        "prompt": result.prompt,
    }


class InlineResults(OrderedDict[str, tuple[int, dict[str, Any]]]):
    """sync_mode results (data URIs): in memory only, never on disk; the oldest go past ``INLINE_BUDGET``."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def hold(self, job_id: str, output: dict[str, Any]) -> None:
        size = sum(len(image["url"]) for image in output["images"])
        self[job_id] = (size, output)
        self.bytes += size
        while self.bytes > INLINE_BUDGET and len(self) > 1:
            old_id, (old_size, _) = self.popitem(last=False)
            self.bytes -= old_size
            log.info("request %s: inline (sync_mode) result dropped from memory to stay under budget", old_id)

    def output(self, job_id: str) -> dict[str, Any] | None:
        held = self.get(job_id)
        return None if held is None else held[1]

    def release(self, job_id: str) -> None:
        held = self.pop(job_id, None)
        if held is not None:
            self.bytes -= held[0]
