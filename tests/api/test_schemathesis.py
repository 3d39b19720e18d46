"""Schemathesis against the server's own OpenAPI document (reliability case R22).

Every operation gets schema-valid and schema-invalid requests; every answer must be non-5xx and
match what the document declares (status code, content type, body schema, headers). Then a
stateful run follows the document's links: submit -> status / result / cancel of that request_id.

Two checks about the *requests* are left out. ``positive_data_acceptance`` (a schema-valid request
must get 2xx): inputs are URLs fetched at run time, webhooks pass an SSRF guard and an
Idempotency-Key may not be reused for another body, so the schema cannot say which valid-looking
requests will be refused, and those refusals (400/422 with a clear message) are correct.
``negative_data_rejection`` (a schema-violating request must get 4xx): the input models coerce like
FastAPI's and fal's own (pydantic's lax mode: ``"true"`` is a boolean, ``true`` a number), by design.

Examples are derandomized and bounded, so the run is the same each time and takes seconds.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from tests.api.fal_wire import inpaint_input

EXAMPLES = 30
EXCLUDED = [positive_data_acceptance, negative_data_rejection]
FAST = {"input_timeout_s": 2.0, "max_batch_size": 4}


def wait_finished(status_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(status_url, timeout=10)
        if response.status_code != 202:  # 200: completed; 404: not this app's request
            return
        time.sleep(0.02)


def hypothesis_settings(examples: int, **extra: Any) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        **extra,
    )


@pytest.fixture
def server(make_server: Callable[..., Any], small_work: None) -> Any:
    return make_server(**FAST)


def schema_of(server: Any) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_operation_answers_as_its_schema_says(server: Any) -> None:
    failures: dict[str, str] = {}
    tested = []
    for result in schema_of(server).get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis_settings(EXAMPLES)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                case.call_and_validate(excluded_checks=EXCLUDED)

            try:
                check()
                tested.append((operation.label, mode.value))
            except Unsatisfiable:
                # No parameters to get wrong (GET /health/live...): nothing negative to send.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as exc:
                failures[f"{operation.label} ({mode.value})"] = "".join(traceback.format_exception_only(exc))
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    labels = {label for label, _ in tested}
    # The document covers the whole API; a route dropped from it would silently go untested.
    for expected in (
        "POST /queue/fal-ai/fast-lightning-sdxl/inpainting",
        "POST /fal-ai/hyper-sdxl/inpainting",
        "GET /queue/{owner}/{alias}/requests/{request_id}/status",
        "GET /queue/{owner}/{alias}/requests/{request_id}",
        "PUT /queue/{owner}/{alias}/requests/{request_id}/cancel",
        "GET /health/ready",
    ):
        assert expected in labels, sorted(labels)


def test_submit_then_status_result_and_cancel_follow_the_links(server: Any) -> None:
    """Stateful: the links of a submit's 200 feed its request_id to status, result and cancel.

    Half of the submits get real inputs (a 64x48 image and mask), so requests also run, succeed,
    are cancelled while queued or running, and have results to fetch; the rest fail at input fetch.
    A result is fetched once its request has finished (before, it is a plain 400 every time).
    """
    real = inpaint_input()
    calls: Counter[tuple[str, int]] = Counter()

    class Workflow(schema_of(server).as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            body = case.body
            positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
            if positive and isinstance(body, dict) and len(str(body.get("prompt", ""))) % 2 == 0:
                body.update(image_url=real["image_url"], mask_url=real["mask_url"], image_size=real["image_size"])
                body.update(num_images=1, embeddings=[], expand_prompt=False)
            if case.method == "GET" and case.operation.label.endswith("{request_id}"):
                wait_finished(f"{case.operation.base_url.rstrip('/')}{case.formatted_path}/status")

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            calls[(case.operation.label, response.status_code)] += 1

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=EXCLUDED, transport_kwargs=kwargs or None)

    Workflow.run(settings=hypothesis_settings(25, stateful_step_count=6))
    seen = {label for label, _ in calls}
    assert any(label.startswith("POST /queue/") for label in seen), calls
    for follow_up in ("/status", "/cancel", "{request_id}"):
        assert any(label.endswith(follow_up) for label in seen), (follow_up, calls)
    # Some requests really ran (the rest were cancelled or failed at input fetch).
    store = server.app.state.store
    deadline = time.monotonic() + 60
    while store.counts().get("queued") or store.counts().get("running"):
        assert time.monotonic() < deadline, store.counts()
        time.sleep(0.05)
    assert store.counts().get("succeeded", 0) > 0, store.counts()
