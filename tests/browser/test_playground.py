"""The playground (``/``) and the operations page (``/ui/status``) in a real browser: Debian's Chromium, headless,
driven with ``playwright-core`` from npm (``tests/browser/driver.mjs``: one browser for the whole module, one
fresh context per scenario) against one in-process server with the tiny engine.

Each scenario (``scenarios.mjs``) does what a person would (controls found by role and label, the mask painted
with mouse events) and returns what the page showed; the assertions are here. Screenshots of every state are
written to ``test-artifacts/browser/`` at the repository root (``INPAINT_TEST_ARTIFACTS`` moves it; git
ignores it). Without ``node`` or Chromium the module is skipped, unless ``INPAINT_REQUIRE_BROWSER=1`` (CI) makes
that a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from server.app import create_app
from server.jobs.job import JobState
from server.settings import load_settings
from tests.helpers import box_mask, noise_image, png
from tests.live import GatedEngine, LiveServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DRIVER = HERE / "driver.mjs"
PLAYWRIGHT = REPO / "tests" / "compat" / "node" / "node_modules" / "playwright-core" / "package.json"
ARTIFACTS = Path(os.environ.get("INPAINT_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"
NODE = shutil.which("node")
CHROMIUM = os.environ.get("INPAINT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
KEY = "browser-test-key"
LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
SCENARIO_TIMEOUT_S = 90

pytestmark = pytest.mark.xdist_group("browser")  # one worker: one browser and one server for the module


def _missing() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    reason = _missing()
    if reason:
        if os.environ.get("INPAINT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser tests are required here but {reason}", pytrace=False)
        pytest.skip(reason)
    if not PLAYWRIGHT.is_file():
        pytest.fail("playwright-core is not installed: run `npm ci --prefix tests/compat/node`", pytrace=False)


class BrowserDriver:
    """``node driver.mjs``: one Chromium; :meth:`run` sends it a scenario and returns what the scenario saw."""

    def __init__(self, base: str, artifacts: Path) -> None:
        artifacts.mkdir(parents=True, exist_ok=True)
        self._log = (artifacts / "driver.log").open("w")
        self.proc = subprocess.Popen(
            [NODE, str(DRIVER), "--base", base, "--artifacts", str(artifacts), "--chromium", CHROMIUM],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0
        hello = self._reply(60)
        assert hello.get("ready"), hello

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the browser driver did not answer within {timeout} s") from None
            if line is None:
                raise AssertionError(f"the browser driver exited (rc {self.proc.poll()}); see {self._log.name}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, scenario: str, **args: Any) -> Any:
        self._next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._next_id, "scenario": scenario, "args": args}) + "\n")
        self.proc.stdin.flush()
        answer = self._reply(SCENARIO_TIMEOUT_S)
        assert answer.get("id") == self._next_id, answer
        if "error" in answer:
            pytest.fail(
                f"browser scenario {scenario} failed (screenshot: {answer.get('screenshot')}):\n{answer['error']}"
            )
        return answer["value"]

    def close(self) -> None:
        try:
            self.run("quit")
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._log.close()


@dataclass
class Site:
    server: LiveServer
    gate: GatedEngine

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Files:
    image: Path
    mask: Path
    not_image: Path

    def image_pixels(self) -> np.ndarray:
        return np.asarray(Image.open(self.image).convert("RGB"))


@pytest.fixture(scope="module")
def site(engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One server for the module: the tiny engine (every variant of both apps) behind a gate that the cancel test
    holds, with an API key."""
    gate = GatedEngine(engine)
    data = tmp_path_factory.mktemp("browser-site")
    settings = load_settings({"data_dir": data, "warmup": False, "api_keys": [KEY]})
    server = LiveServer(create_app(settings, engine=gate)).start()
    yield Site(server, gate)
    gate.release.set()
    server.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("browser-files")
    image = folder / "photo.png"
    image.write_bytes(png(noise_image(64, 64, seed=5)))
    mask = folder / "mask.png"
    mask.write_bytes(png(box_mask(64, 64)))
    not_image = folder / "notes.txt"
    not_image.write_text("these are notes, not an image\n")
    return Files(image, mask, not_image)


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[BrowserDriver]:
    for stale in ARTIFACTS.glob("*.png"):  # screenshots of an earlier run
        stale.unlink()
    driver = BrowserDriver(site.url, ARTIFACTS)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def painted(browser: BrowserDriver, files: Files) -> dict[str, Any]:
    """Load, pick the image, paint a stroke, submit, watch it run, get the result (and see it kept)."""
    return browser.run("paint_and_submit", key=KEY, image=str(files.image))


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    assert header.endswith(";base64"), header
    return base64.b64decode(payload)


def _distance_to_segment(shape: tuple[int, int], start: list[float], end: list[float]) -> np.ndarray:
    """Each pixel centre's distance to the segment ``start``-``end`` (image coordinates)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))


def test_paint_submit_watch_and_get_the_result(painted: dict[str, Any], site: Site, files: Files) -> None:
    # The run was watched live: the steps from the status stream's logs, then done.
    assert "Step 2 of 2" in painted["seen"]["progress"], painted["seen"]
    assert any(text.startswith("Done in") for text in painted["seen"]["status"]), painted["seen"]
    assert any("Step 1/2" in line for line in painted["logs"]) and any("Step 2/2" in line for line in painted["logs"])
    # The result: the size asked for, its seed and timings, a download link to this server.
    assert (painted["result"]["width"], painted["result"]["height"]) == (64, 64)
    assert "Seed\n1234" in painted["facts"] and "Timing: inference" in painted["facts"], painted["facts"]
    assert painted["download"] == painted["result"]["src"]
    assert painted["result"]["src"].startswith(f"{site.url}/files/")

    # What was sent is fal's input: the image's own bytes, and a mask of its size, white where painted.
    [submit] = painted["submits"]
    body = submit["body"]
    assert submit["url"] in (f"{site.url}/queue/{LIGHTNING}", f"{site.url}/{LIGHTNING}/stream")
    assert body["image_size"] == {"width": 64, "height": 64} and body["num_inference_steps"] == "2"
    assert body["seed"] == 1234 and body["format"] == "png" and body["prompt"] == "a red door"
    assert _decode_data_uri(body["image_url"]) == files.image.read_bytes()
    assert body["mask_url"].startswith("data:image/png;base64,")
    mask = np.asarray(Image.open(io.BytesIO(_decode_data_uri(body["mask_url"]))).convert("L"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    stroke = painted["stroke"]
    distance = _distance_to_segment(mask.shape, stroke["from"], stroke["to"])
    radius = stroke["brush"] / 2
    assert (mask[distance <= radius - 1.5] == 255).all(), "the painted stroke is not all in the mask"
    assert (mask[distance >= radius + 1.5] == 0).all(), "the mask has white outside the painted stroke"

    # The painted region is the region that changed: outside it the output is the input, pixel for pixel (PNG).
    output = np.asarray(Image.open(io.BytesIO(httpx.get(painted["result"]["src"]).content)).convert("RGB"))
    source = files.image_pixels()
    keep, repaint = mask == 0, mask == 255
    assert (output[keep] == source[keep]).all(), "pixels outside the mask changed"
    changed = (output[repaint] != source[repaint]).any(axis=-1).mean()
    assert changed > 0.5, f"only {changed:.0%} of the painted pixels changed"

    # Kept in the browser, not on the server: after a reload the key and the before/after view are back.
    assert painted["keyKept"] == KEY and painted["keyAfterReload"] == KEY
    assert len(painted["history"]) == 1 and "a red door" in painted["history"][0]
    assert painted["clip"] == "inset(0px 0px 0px 20%)"


def _skip_without_previews(site: Site) -> None:
    paths = httpx.get(f"{site.url}/openapi.json").json()["paths"]
    if f"/{LIGHTNING}/stream" not in paths:
        pytest.skip(f"this build has no step-preview stream (POST /{LIGHTNING}/stream, issue 14 item 2)")


def test_step_previews_show_while_the_steps_run(painted: dict[str, Any], site: Site) -> None:
    _skip_without_previews(site)
    assert painted["submits"][0]["url"] == f"{site.url}/{LIGHTNING}/stream"
    assert painted["seen"]["previews"][-1] == "Preview of step 2 of 2", painted["seen"]
    assert painted["seen"]["previewSources"] >= 1  # one per step, but a step may be skipped (never the last)


def _release_after_cancel(site: Site, timeout: float = 30.0) -> threading.Thread:
    """Let the held engine go once the server has recorded a cancel of the running request (or the gate was
    released otherwise: the test ended)."""
    store = site.server.app.state.store

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not site.gate.release.is_set():
            if any(job.cancel_requested and job.state is JobState.RUNNING for job in store.unfinished()):
                break
            time.sleep(0.01)
        site.gate.release.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("previews", [False, True], ids=["queue", "previews"])
def test_cancel_a_running_request_from_the_page(
    browser: BrowserDriver, site: Site, files: Files, previews: bool
) -> None:
    if previews:
        _skip_without_previews(site)
    gate = site.gate
    gate.release.clear()
    gate.started.clear()
    gate.hold = True
    watcher = _release_after_cancel(site)
    try:
        seen = browser.run("cancel_running", key=KEY, image=str(files.image), previews=previews)
    finally:
        gate.hold = False
        gate.release.set()
        watcher.join(5)
    assert seen["running"] == "Running"
    assert seen["error"].startswith("499 cancelled:") and "cancelled while running" in seen["error"], seen["error"]
    assert seen["status"] == "Failed" and seen["generateEnabled"]
    assert any("Cancellation requested" in line for line in seen["logs"]), seen["logs"]
    assert not any("Step 4/4" in line for line in seen["logs"]), "the cancelled request ran to its end"


def test_a_bad_input_shows_the_servers_message(browser: BrowserDriver, site: Site, files: Files) -> None:
    seen = browser.run("bad_input", key=KEY, notImage=str(files.not_image))
    assert "cannot show notes.txt" in seen["info"], seen["info"]
    # The server's own words: those of the failed request's result (a file it could not use), and a 422's detail
    # items for a field it refused at submit.
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Key {KEY}"}) as client:
        failed = next(r for r in client.get("/queue/requests").json()["requests"] if r["state"] == "failed")
        answer = client.get(failed["status_url"].removesuffix("/status"))
    [item] = answer.json()["detail"]
    assert seen["error"] == f"{answer.status_code} {failed['error_type']}: {item['loc'][-1]}: {item['msg']}"
    assert seen["invalid"] == "422 invalid_input: num_images: Input should be greater than or equal to 1"
    assert seen["prompt"] == "a red door", "the inputs are still there"


def test_the_mask_tools(browser: BrowserDriver, files: Files) -> None:
    seen = browser.run("mask_tools", image=str(files.image))
    assert seen["dropped"] == "photo.png, 64 × 64: nothing painted yet."
    shares = seen["shares"]
    assert shares["start"] == 0 and 15 < shares["painted"] < 40, shares
    assert seen["eraserPressed"] == "true" and shares["erased"] < shares["painted"]
    assert shares["undone"] == shares["painted"]
    assert shares["inverted"] == pytest.approx(100 - shares["painted"], abs=0.2)
    assert shares["cleared"] == 0 and shares["clearUndone"] == shares["inverted"]
    # The form is each app's own: its step counts and default, its fields; what was set carries over.
    assert seen["hyper"] == {"steps": "1", "choices": ["1", "2", "4"], "strength": "0.5", "checkerVersion": 0}
    assert seen["lightning"] == {"steps": "4", "choices": ["1", "2", "4", "8"]}


def test_side_by_side_runs_two_variants(browser: BrowserDriver, files: Files) -> None:
    variants = ["Lightning 1 step", "Hyper 1 step"]
    seen = browser.run("side_by_side", key=KEY, image=str(files.image), mask=str(files.mask), variants=variants)
    assert [card["label"] for card in seen["cards"]] == variants
    assert seen["seed"].isdigit()
    # Same inputs for both, the mask file's own mask (white = repaint) among them; only app and steps differ.
    first, second = (submit["body"] for submit in seen["submits"])
    assert [s["url"].split("/")[-2] for s in seen["submits"]] == ["fast-lightning-sdxl", "hyper-sdxl"]
    assert first["seed"] == second["seed"] == int(seen["seed"])
    assert first["num_inference_steps"] == second["num_inference_steps"] == "1"
    assert first["mask_url"] == second["mask_url"] and first["image_url"] == second["image_url"]
    sent = np.asarray(Image.open(io.BytesIO(_decode_data_uri(first["mask_url"]))).convert("L"))
    assert (sent == np.asarray(Image.open(files.mask).convert("L"))).all()
    srcs = set()
    for card in seen["cards"]:
        assert card["size"] == [64, 64], card
        assert "s end to end" in card["text"] and "inference" in card["text"], card
        assert card["text"].endswith(f"seed {seen['seed']}"), "every variant ran with the same seed"
        srcs.add(card["src"])
    assert len(srcs) == 2


@pytest.mark.parametrize("viewport", [(1280, 800), (390, 844)])
def test_the_pages_fit_a_desktop_and_a_phone(browser: BrowserDriver, files: Files, viewport: tuple[int, int]) -> None:
    width, height = viewport
    report = browser.run("layout", key=KEY, image=str(files.image), width=width, height=height)
    for name, page in report["pages"].items():
        assert page["overflow"] <= 0, f"{name} at {width}x{height} scrolls sideways by {page['overflow']} px"
        assert page["hidden"] == [], f"{name} at {width}x{height}: not visible on screen: {page['hidden']}"


def test_the_status_page_shows_readiness_variants_queue_and_this_keys_requests(
    browser: BrowserDriver, painted: dict[str, Any]
) -> None:
    request_id = urlsplit(painted["result"]["src"]).path.split("/")[2]
    seen = browser.run("status_page", key=KEY, expect=request_id)
    assert seen["readiness"] == "ready" and seen["queueDepth"] == "0" and seen["workers"] == "1"
    assert len(seen["variants"]) == 7 and "Hyper 1 step (fal-ai/hyper-sdxl/inpainting)" in seen["variants"]
    rows = {row[0]: row for row in seen["rows"]}
    assert rows[request_id][1:3] == [LIGHTNING, "succeeded"], rows[request_id]
    assert seen["withoutKey"].startswith("401"), seen["withoutKey"]


def test_no_page_asks_any_host_but_the_server(browser: BrowserDriver, site: Site) -> None:
    """Last in the module: every request of every scenario above went to the server (or was a data:/blob: URL),
    and no page threw an error."""
    seen = browser.run("requests")
    origin = site.url
    foreign = [
        r["url"]
        for r in seen["requests"]
        if not r["url"].startswith(f"{origin}/") and urlsplit(r["url"]).scheme not in ("data", "blob")
    ]
    assert foreign == []
    assert len(seen["requests"]) > 10  # pages were loaded: this is no empty list passing
    assert seen["pageErrors"] == []
