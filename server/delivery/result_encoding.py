"""Model outputs: a result's images encoded as files in the file store, or as data URIs (``sync_mode``)."""

from __future__ import annotations

import base64
import logging
from typing import Any

from pipelines.encode import CONTENT_TYPES, encode_image

from ..jobs.job import Job
from .file_store import FileStore

log = logging.getLogger("inpaint-server.jobs")


def encode_output(job: Job, result: Any, files: FileStore) -> dict[str, Any]:
    """fal's output JSON for an engine result. Files are written under the data dir, or (``sync_mode``)
    the images are inlined as data URIs and nothing touches the disk. Runs off the event loop. A write that
    fails (``OSError``: a full disk) is raised; the files written before it stay, for the caller to remove."""
    fmt = job.input.get("format", "jpeg")
    images, names = [], []
    for k, image in enumerate(result.images):
        data = encode_image(image, fmt)
        name = f"{k}.{fmt}"
        if job.sync_mode:
            url = f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(data).decode()}"
        else:
            files.write_result(job.id, name, data)
            names.append(name)
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
    job.files = names  # once every file is written (a second try after a full disk writes them all again)
    return {
        "images": images,
        "timings": result.timings,
        "seed": result.seed,
        "has_nsfw_concepts": result.has_nsfw_concepts,
        "prompt": result.prompt,
    }
