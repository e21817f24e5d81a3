"""One browser session's Chromium, driven with Playwright over CDP.

``BrowserTab.open`` reaches the guest's DevTools through a ``DevtoolsTunnel``
(starting Chromium first if it does not listen yet), connects Playwright's
``connect_over_cdp`` to it and opens one context (viewport, user agent) with
one page. Every action is Playwright's, with its own waiting; its errors
become ``kiln.browser.errors`` here, in one place. ``PlaywrightHost`` is the
one Playwright driver process of the server, started on first use.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import httpx
from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout

from kiln.browser import guest, scripts
from kiln.browser.errors import (
    BadSelector,
    BrowserError,
    BrowserGone,
    ElementMissing,
    NavigationFailed,
    WaitExpired,
)
from kiln.browser.tunnel import DevtoolsTunnel
from kiln.runtime.driver import AgentChannel

# How long Chromium may take to answer on DevTools after its start (TCG is slow:
# a guest busy starting Chromium answers each request slowly too).
READY_SECONDS = 300.0
POLL_SECONDS = 0.5
POLL_TIMEOUT_SECONDS = 30.0
CLOSED_MARKERS = ("has been closed", "Target closed", "Browser closed", "Connection closed")
MAX_ELEMENTS = 500
MAX_CONTENT_CHARS = 100_000
MAX_INTERACTIVE = 200
WAIT_CONDITIONS = frozenset(
    {"visible", "hidden", "attached", "detached", "load", "domcontentloaded", "networkidle", "timeout"}
)
SELECTOR_CONDITIONS = frozenset({"visible", "hidden", "attached", "detached"})


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    user_agent: str | None = None


class PlaywrightHost:
    """The server's Playwright driver (a Node.js process), started once on first use."""

    def __init__(self) -> None:
        self._playwright: Playwright | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Playwright:
        async with self._lock:
            if self._playwright is None:
                self._playwright = await async_playwright().start()
            return self._playwright

    async def stop(self) -> None:
        async with self._lock:
            if self._playwright is not None:
                await self._playwright.stop()
                self._playwright = None


class BrowserTab:
    """The page of one session; not safe for concurrent actions (the caller serialises)."""

    def __init__(self, agent: AgentChannel, host: PlaywrightHost, viewport: Viewport) -> None:
        self._agent = agent
        self._host = host
        self.viewport = viewport
        self._tunnel = DevtoolsTunnel(agent, guest.DEVTOOLS_PORT)
        self._browser: Browser | None = None
        self._context: BrowserContext | None = None
        self._page: Page | None = None

    @property
    def alive(self) -> bool:
        return (
            self._browser is not None
            and self._browser.is_connected()
            and self._page is not None
            and (not self._page.is_closed())
        )

    async def open(self) -> None:
        """Start Chromium if needed, connect, open the session's page."""
        if self._tunnel.port == 0:
            await self._tunnel.open()
        await guest.launch(self._agent)
        await self._wait_devtools()
        playwright = await self._host.get()
        try:
            self._browser = await playwright.chromium.connect_over_cdp(
                self._tunnel.endpoint, timeout=READY_SECONDS * 1000
            )
            # The browser's own context and its first page: their renderer is running
            # already (in the base snapshot), a new context would start another (slow under TCG).
            self._context = self._browser.contexts[0]
            pages = self._context.pages
            self._page = pages[0] if pages else await self._context.new_page()
            # Visible and focused: a background page gets no animation frames, and
            # Playwright's clicks wait for two of them (the element is "stable").
            await self._page.bring_to_front()
            await self._page.set_viewport_size({"width": self.viewport.width, "height": self.viewport.height})
            if self.viewport.user_agent:
                devtools = await self._context.new_cdp_session(self._page)
                await devtools.send("Emulation.setUserAgentOverride", {"userAgent": self.viewport.user_agent})
        except PlaywrightError as error:
            raise BrowserGone(f"the browser in the VM did not take the connection: {error.message}") from error

    async def close(self) -> None:
        """Disconnect (the VM and its Chromium go with the session)."""
        browser, self._browser, self._page, self._context = self._browser, None, None, None
        if browser is not None:
            try:
                await browser.close()
            except PlaywrightError:
                pass  # already gone
        await self._tunnel.close()

    async def _wait_devtools(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        async with httpx.AsyncClient(timeout=POLL_TIMEOUT_SECONDS) as client:
            while True:
                try:
                    response = await client.get(f"{self._tunnel.endpoint}/json/version")
                    if response.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    tail = await guest.log_tail(self._agent)
                    raise BrowserGone(f"chromium did not start in the VM within {READY_SECONDS:g}s: {tail}")
                await asyncio.sleep(POLL_SECONDS)

    # -- actions -------------------------------------------------------------

    @property
    def page(self) -> Page:
        if self._page is None:
            raise BrowserGone("the browser is not connected")
        return self._page

    async def navigate(self, url: str, timeout_ms: float) -> dict[str, Any]:
        try:
            response = await self.page.goto(url, wait_until="load", timeout=timeout_ms)
        except PlaywrightTimeout as error:
            raise WaitExpired(f"navigation to {url} did not finish loading within {timeout_ms:g} ms") from error
        except PlaywrightError as error:
            raise _translate(error, f"navigation to {url}") from error
        return {
            "url": self.page.url,
            "title": await self._guard(self.page.title()),
            "status": response.status if response is not None else None,
        }

    async def click(self, selector: str, force: bool, timeout_ms: float) -> None:
        await self._act(selector, timeout_ms, "click", force=force)

    async def type(self, selector: str, text: str, delay_ms: float, timeout_ms: float) -> None:
        await self._act(selector, timeout_ms, "press_sequentially", text, delay=delay_ms)

    async def fill(self, selector: str, value: str, timeout_ms: float) -> None:
        await self._act(selector, timeout_ms, "fill", value)

    async def scroll(self, selector: str | None, x: int | None, y: int | None, timeout_ms: float) -> dict[str, Any]:
        if selector is not None:
            await self._act(selector, timeout_ms, "scroll_into_view_if_needed")
        else:
            await self._guard(self.page.evaluate("([x, y]) => window.scrollTo(x, y)", [x or 0, y or 0]))
        position = await self._guard(self.page.evaluate("() => [window.scrollX, window.scrollY]"))
        return {"scroll_x": position[0], "scroll_y": position[1]}

    async def wait(self, condition: str, selector: str | None, timeout_ms: float) -> None:
        try:
            if condition == "timeout":
                await self.page.wait_for_timeout(timeout_ms)
            elif condition in SELECTOR_CONDITIONS:
                assert selector is not None, "the service asks for a selector"
                await self.page.locator(selector).first.wait_for(state=condition, timeout=timeout_ms)  # type: ignore[arg-type]
            else:
                await self.page.wait_for_load_state(condition, timeout=timeout_ms)  # type: ignore[arg-type]
        except PlaywrightTimeout as error:
            what = f"{selector!r} to be {condition}" if selector else condition
            raise WaitExpired(f"waited {timeout_ms:g} ms for {what}") from error
        except PlaywrightError as error:
            raise _translate(error, f"wait for {condition}") from error

    async def screenshot(
        self, full_page: bool, image_type: str, clip: dict[str, float] | None, quality: int | None
    ) -> str:
        """The page as base64: png or jpeg by Playwright, webp by CDP's own capture (Playwright has none)."""
        if image_type == "webp":
            return await self._guard(self._webp(full_page, clip, quality))
        options: dict[str, Any] = {"type": image_type, "full_page": full_page and clip is None}
        if clip is not None:
            options["clip"] = clip
        if quality is not None and image_type == "jpeg":
            options["quality"] = quality
        data = await self._guard(self.page.screenshot(**options))
        return base64.b64encode(data).decode("ascii")

    async def _webp(self, full_page: bool, clip: dict[str, float] | None, quality: int | None) -> str:
        assert self._context is not None
        devtools = await self._context.new_cdp_session(self.page)
        try:
            params: dict[str, Any] = {"format": "webp"}
            if quality is not None:
                params["quality"] = quality
            if clip is None and full_page:
                size = (await devtools.send("Page.getLayoutMetrics"))["cssContentSize"]
                clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"]}
            if clip is not None:
                params |= {"clip": {**clip, "scale": 1}, "captureBeyondViewport": True}
            return str((await devtools.send("Page.captureScreenshot", params))["data"])
        finally:
            await devtools.detach()

    async def extract_elements(self, selector: str, attributes: list[str] | None) -> list[dict[str, Any]]:
        await self._check_selector(selector)
        argument = {"selector": selector, "attributes": attributes or [], "limit": MAX_ELEMENTS}
        return await self._guard(self.page.evaluate(scripts.EXTRACT_ELEMENTS, argument))

    async def extract_content(self, include_interactive: bool, include_anchors: bool, max_anchors: int) -> dict:
        argument = {
            "includeInteractive": include_interactive,
            "includeAnchors": include_anchors,
            "maxAnchors": max_anchors,
            "maxChars": MAX_CONTENT_CHARS,
            "maxInteractive": MAX_INTERACTIVE,
        }
        return await self._guard(self.page.evaluate(scripts.EXTRACT_CONTENT, argument))

    async def _act(self, selector: str, timeout_ms: float, action: str, *args: Any, **options: Any) -> None:
        await self._check_selector(selector)
        locator = self.page.locator(selector).first
        try:
            await getattr(locator, action)(*args, timeout=timeout_ms, **options)
        except PlaywrightTimeout as error:
            if await self._guard(self.page.locator(selector).count()) == 0:
                raise ElementMissing(f"no element matches {selector!r} (waited {timeout_ms:g} ms)") from error
            raise WaitExpired(
                f"{action} on {selector!r}: the element did not become ready within {timeout_ms:g} ms"
            ) from error
        except PlaywrightError as error:
            raise _translate(error, f"{action} on {selector!r}") from error

    async def _check_selector(self, selector: str) -> None:
        await self._guard(self.page.locator(selector).count())

    async def _guard(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except PlaywrightError as error:
            raise _translate(error, "the page") from error


def _translate(error: PlaywrightError, doing: str) -> BrowserError:
    message = (error.message or str(error)).splitlines()[0]
    if any(marker in message for marker in CLOSED_MARKERS):
        return BrowserGone(f"{doing}: the browser went away ({message})")
    if "net::ERR_" in message:
        return NavigationFailed(f"{doing} failed: {message}")
    if "selector" in message.lower() and ("parse" in message.lower() or "valid" in message.lower()):
        return BadSelector(f"{doing}: {message}")
    return BrowserError(f"{doing} failed: {message}")
