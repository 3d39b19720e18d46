"""The scope rules of temporary tokens: which apps an ``allowed_apps`` entry names, and what a token may
mint (never more than it holds)."""

from __future__ import annotations

import pytest

from server.http.access_tokens import AccessTokens, Grant, narrow, scope_apps
from server.http.errors import Unauthorized, ValidationFailed

HYPER = "fal-ai/hyper-sdxl/inpainting"
LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
SERVED = [HYPER, LIGHTNING, "fal-ai/hyper-sdxl/image-to-image"]


@pytest.mark.parametrize(
    ("requested", "scopes"),
    [
        (["hyper-sdxl"], ("fal-ai/hyper-sdxl",)),  # the alias, as the fal clients send it
        (["fal-ai/hyper-sdxl/"], ("fal-ai/hyper-sdxl",)),
        ([HYPER], (HYPER,)),
        ([f"{HYPER}/stream"], (HYPER,)),  # a route under an app (the JS tokenProvider's argument): the app
        (["fast-lightning-sdxl", HYPER], (LIGHTNING.rsplit("/", 1)[0], HYPER)),
    ],
)
def test_entries_name_served_apps(requested: list[str], scopes: tuple[str, ...]) -> None:
    assert scope_apps(requested, SERVED) == scopes


@pytest.mark.parametrize("entry", ["fal-ai", "hyper", "fal-ai/hyper", "fal-ai/hyper-sdxl-x", "other/hyper-sdxl", ""])
def test_entries_that_name_no_served_app_are_422(entry: str) -> None:
    with pytest.raises(ValidationFailed):
        scope_apps([entry], SERVED)


def test_a_token_mints_only_within_its_own_apps() -> None:
    assert narrow(("fal-ai/hyper-sdxl",), (HYPER,)) == (HYPER,)  # asked wider: gets what it holds
    assert narrow((HYPER,), ("fal-ai/hyper-sdxl",)) == (HYPER,)  # asked narrower: gets that
    assert narrow(("fal-ai/fast-lightning-sdxl",), ("fal-ai/hyper-sdxl",)) == ()
    grant = Grant("o", (HYPER,), 100)
    assert grant.allows(HYPER) and not grant.allows("fal-ai/hyper-sdxl/image-to-image")
    assert grant.allows_endpoint("fal-ai/hyper-sdxl") and not grant.allows_endpoint("fal-ai/fast-lightning-sdxl")


def test_tokens_round_trip_and_expire() -> None:
    tokens = AccessTokens(b"s" * 32)
    grant = Grant("owner", (HYPER,), 1000)
    token = tokens.issue(grant, 900)
    assert tokens.verify(token, 999) == grant
    with pytest.raises(Unauthorized, match="expired"):
        tokens.verify(token, 1000)
    with pytest.raises(Unauthorized, match="invalid"):
        AccessTokens(b"t" * 32).verify(token, 999)
