"""What a 422 echoes of the refused input (issue 13, item 12): long values cut to a prefix with their length,
always JSON-encodable (no NaN, no lone surrogate), in FastAPI's ``detail`` shape."""

from __future__ import annotations

import json
import math

from server.http.errors import ECHO_MAX_DEPTH, ECHO_MAX_ITEMS, abridged, validation_errors_body


def test_long_strings_keep_a_prefix_and_their_length() -> None:
    uri = "data:image/png;base64," + "iVBO" * 7000
    assert abridged(uri) == f"{uri[:40]}… ({len(uri)} chars)"
    assert abridged("x" * 100) == "x" * 100  # up to 100 characters: whole
    raw = b"\x89PNG" * 100
    assert abridged(raw) == raw[:40].decode("utf-8", "replace") + "… (400 bytes)"


def test_nested_values_are_cut_at_every_level() -> None:
    value = {"a": [{"b": "y" * 1000}] * 50, **{f"k{i}": i for i in range(30)}}
    out = abridged(value)
    assert len(out) == ECHO_MAX_ITEMS + 1 and out["…"] == f"{len(value) - ECHO_MAX_ITEMS} more keys"
    assert out["a"][:2] == [{"b": "y" * 40 + "… (1000 chars)"}] * 2
    assert out["a"][-1] == f"… ({50 - ECHO_MAX_ITEMS} more items)"
    deep: list = []
    for _ in range(ECHO_MAX_DEPTH + 5):
        deep = [deep]
    flat = json.dumps(abridged(deep), ensure_ascii=False)
    assert flat.count("[") == ECHO_MAX_DEPTH and '"…"' in flat


def test_what_json_cannot_carry_is_spelled_out() -> None:
    assert abridged([math.nan, math.inf, -math.inf, 1.5]) == ["NaN", "Infinity", "-Infinity", 1.5]
    assert abridged("a \ud800 b") == "a \ufffd b"
    assert abridged("a 😀 b") == "a 😀 b"


def test_the_body_keeps_fastapis_detail_shape() -> None:
    errors = [
        {"type": "missing", "loc": ("body", "mask_url"), "msg": "Field required", "input": {"image_url": "z" * 500}},
        {
            "type": "finite_number",
            "loc": ("body", "strength"),
            "msg": "Input should be a finite number",
            "input": math.nan,
        },
        {
            "type": "value_error",
            "loc": ("body", "prompt"),
            "msg": "bad",
            "input": "\udfff",
            "ctx": {"error": ValueError("e")},
        },
    ]
    body = validation_errors_body(errors)
    text = json.dumps(body, allow_nan=False).encode()  # what a JSON response renders: no NaN, valid UTF-8
    assert len(text) < 500
    detail = body["detail"]
    assert [d["loc"] for d in detail] == [["body", "mask_url"], ["body", "strength"], ["body", "prompt"]]
    assert detail[0]["input"] == {"image_url": "z" * 40 + "… (500 chars)"}
    assert detail[1]["input"] == "NaN" and detail[2]["ctx"] == {"error": "e"}
