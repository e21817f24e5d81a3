"""Phase ``browser`` of ``kiln bench``: browser sessions through the API.

Each session is a VM of the ``browser`` image restored from its warm base
snapshot (Chromium running; made in prep, untimed, on first use). Figures:

- ``browser_create_ms``: ``POST /v1/browser/sessions/`` until it answers (the
  VM restored, DevTools tunnelled, Playwright connected, a page open);
- ``browser_navigate_ms``: ``navigate`` to a local page (a ``data:`` URL of a
  small form: no network, so the browser's own cost) until it has loaded;
- ``browser_screenshot_ms``: a PNG of the viewport (800x600), base64 in JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from bench.stats import Figures
from kiln.config import Settings
from kiln.runtime.driver import BootImage

FIGURES = ("browser_create_ms", "browser_navigate_ms", "browser_screenshot_ms")
PAGE = (
    "data:text/html,<title>bench</title><body style='background:rgb(0,128,255)'>"
    "<h1>Kiln bench</h1><form><input id=q><button id=go type=button>Go</button></form></body>"
)
VIEWPORT = {"viewport_width": 800, "viewport_height": 600}
# A restored browser VM's agent answers once its Chromium lets the guest (tens of seconds under a loaded TCG).
SERVER_ENV = {"KILN_BOOT_TIMEOUT_SECONDS": "300"}


class BrowserFailed(Exception):
    pass


def declare(figures: Figures) -> None:
    ms = "ms"
    figures.declare(
        "browser_create_ms",
        ms,
        note="POST /v1/browser/sessions/ (a browser-image VM restored from "
        "its base snapshot with Chromium running, connected over CDP, a page open)",
    )
    figures.declare("browser_navigate_ms", ms, note="navigate to a local data: page until its load event")
    figures.declare("browser_screenshot_ms", ms, note="a PNG screenshot of the 800x600 viewport, base64 in JSON")


def prepare(settings: Settings) -> BootImage:
    """The browser image and its warm base snapshot in the shape sessions use (untimed)."""
    from kiln.browser.guest import BROWSER_VARIANT, WARM_UPS
    from kiln.runtime.images import ImageStore
    from kiln.runtime.qemu import QemuHypervisor
    from kiln.runtime.snapshots import BaseSnapshots, Shape

    image = ImageStore(settings).build(BROWSER_VARIANT)
    base = BaseSnapshots(settings, QemuHypervisor(settings), warm_ups=WARM_UPS)
    asyncio.run(base.ensure(image, Shape(settings.browser_memory_mb, settings.browser_vcpu_count)))
    return image


def timed(call: Callable[[], httpx.Response]) -> tuple[float, dict]:
    started = time.monotonic()
    response = call()
    elapsed = (time.monotonic() - started) * 1000
    if response.status_code != 200:
        raise BrowserFailed(f"{response.request.url.path} answered {response.status_code}: {response.text[:300]}")
    return elapsed, response.json()


def measure(figures: Figures, client: httpx.Client, sessions: int, actions: int) -> None:
    for _ in range(sessions):
        elapsed, created = timed(lambda: client.post("/v1/browser/sessions/", json=VIEWPORT, timeout=600))
        figures["browser_create_ms"].add(elapsed)
        try:
            exercise(figures, client, created["session_id"], actions)
        finally:
            client.delete(f"/v1/browser/sessions/{created['session_id']}")


def exercise(figures: Figures, client: httpx.Client, session_id: str, actions: int) -> None:
    navigate = {"session_id": session_id, "url": PAGE}
    screenshot = {"session_id": session_id, "full_page": False}
    for _ in range(actions):
        elapsed, _ = timed(lambda: client.post("/v1/browser/interactions/navigate", json=navigate))
        figures["browser_navigate_ms"].add(elapsed)
        elapsed, _ = timed(lambda: client.post("/v1/browser/interactions/screenshot", json=screenshot))
        figures["browser_screenshot_ms"].add(elapsed)
