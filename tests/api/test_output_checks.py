"""What the engine checks about its own output, seen over HTTP (reliability cases M9 and M11).

M9: a decode with NaN/inf values is never returned as an image. The engine decodes it again in fp32;
when that is still unusable the job fails ``nan_output`` (500) and the server goes on serving. A black
decode is a picture like any other (issue 10: not mistaken for an overflow). M11: a prompt past CLIP's
77 tokens is served, and the job's logs say which part of it was ignored. Both run in the real tiny
engine; the NaN comes from a forward hook on its VAE decoder, as an fp16 overflow would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.api.fal_wire import LIGHTNING, data_uri
from tests.api.queue_ops import inpaint_input, requests_url, result, submit, wait_all_completed
from tests.helpers import box_mask, png


@pytest.fixture
def broken_decoder(engine: Any) -> Iterator[Callable[[Callable[[torch.Tensor], torch.Tensor], int | None], list[int]]]:
    """``broken_decoder(replace, times)`` swaps the VAE decoder's output of every loaded variant for
    ``replace(out)`` on its first ``times`` calls (all when None); returns the list of calls seen."""
    handles = []

    def install(replace: Callable[[torch.Tensor], torch.Tensor], times: int | None = None) -> list[int]:
        calls: list[int] = []

        def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            calls.append(out.shape[0])
            return replace(out) if times is None or len(calls) <= times else out

        decoders = {id(d): d for d in (engine.pipeline(v).vae.decoder for v in engine.variants.values())}
        handles.extend(decoder.register_forward_hook(hook) for decoder in decoders.values())  # shared VAEs once
        return calls

    yield install
    for handle in handles:
        handle.remove()


def _log_lines(body: dict[str, Any], level: str | None = None) -> list[str]:
    return [entry["message"] for entry in body["logs"] if level is None or entry["level"] == level]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_an_unusable_decode_fails_nan_output_over_http(make_server, broken_decoder, value: float) -> None:
    """M9 over HTTP: queue and sync run both answer ``nan_output``; no image file is written."""
    calls = broken_decoder(lambda out: torch.full_like(out, value))
    server = make_server()
    files = server.app.state.settings.data_dir / "files"
    with httpx.Client(base_url=server.url, timeout=60) as client:
        request_id = submit(client, seed=3)
        body = wait_all_completed(client, [request_id])[request_id]
        assert body["error_type"] == "nan_output", body
        assert any("NaN/inf values" in line for line in _log_lines(body, "ERROR"))
        answer = client.get(requests_url(request_id))
        assert answer.status_code == 500, answer.text
        assert answer.json()["error_type"] == "nan_output" and "no image was returned" in answer.json()["detail"]
        assert answer.headers["x-fal-error-type"] == "nan_output"
        assert len(calls) == 2  # the decode and its fp32 retry

        sync = client.post(f"/{LIGHTNING}", json=inpaint_input(seed=4))
        assert sync.status_code == 500 and sync.json()["error_type"] == "nan_output", sync.text
    assert [path for path in files.rglob("*") if path.is_file()] == []


def test_the_server_keeps_serving_after_nan_output(make_server, broken_decoder) -> None:
    """M9: the failure is the request's; the next request on the same server succeeds."""
    broken_decoder(lambda out: torch.full_like(out, float("nan")), 2)  # the first request's decode and retry
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        bad = submit(client, seed=3)
        assert wait_all_completed(client, [bad])[bad]["error_type"] == "nan_output"
        good = submit(client, seed=3)
        body = wait_all_completed(client, [good])[good]
        assert "error" not in body, body
        assert result(client, good)["images"][0]["url"]
        assert client.get("/health/ready").status_code == 200


def test_an_overflow_saved_by_the_fp32_decode_is_served_with_a_warning(make_server, broken_decoder) -> None:
    """M9: when only the first decode is bad, the user gets the image and a WARN line saying why."""
    broken_decoder(lambda out: torch.full_like(out, float("nan")), 1)
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        request_id = submit(client, seed=3)
        body = wait_all_completed(client, [request_id])[request_id]
        assert "error" not in body, body
        assert any("decoded in fp32" in line for line in _log_lines(body, "WARN"))
        assert result(client, request_id)["images"]


def test_an_overlong_prompt_is_served_and_its_truncation_is_in_the_logs(make_server) -> None:
    """M11: a 300-word prompt succeeds; a WARN log line quotes the part CLIP ignored. Short ones get none."""
    long_prompt = " ".join(f"lighthouse{i}" for i in range(300))
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        long_id = submit(client, prompt=long_prompt, seed=1)
        short_id = submit(client, prompt="a red door", seed=1)
        bodies = wait_all_completed(client, [long_id, short_id])
        assert "error" not in bodies[long_id] and "error" not in bodies[short_id]
        (warning,) = _log_lines(bodies[long_id], "WARN")
        assert "longer than CLIP's 77 tokens" in warning and "lighthouse2" in warning
        assert _log_lines(bodies[short_id], "WARN") == []
        assert result(client, long_id)["prompt"] == long_prompt  # echoed in full, as fal does


def test_a_mask_of_another_size_is_stretched_and_the_logs_say_so(make_server) -> None:
    """As fal does, a mask of another size than the image is resized to it; a WARN line says so."""
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        request_id = submit(client, mask_url=data_uri(png(box_mask(32, 32))), seed=1)
        body = wait_all_completed(client, [request_id])[request_id]
        assert "error" not in body, body
        (warning,) = _log_lines(body, "WARN")
        assert warning.startswith("The mask is 32x32 but the image is 64x48: the mask was resized to 64x48"), warning
        assert len(result(client, request_id)["images"]) == 1
