"""What can go wrong driving a browser, by what the caller should be told."""

from __future__ import annotations


class BrowserError(Exception):
    """Base of the driver's failures; ``str()`` is fit for an API answer."""


class ElementMissing(BrowserError):
    """No element matches the selector (the SDK's ElementNotFoundError: 404)."""


class WaitExpired(BrowserError):
    """A wait, or an action's wait for its element, ran out of time (408)."""


class BadSelector(BrowserError):
    """The selector is no CSS (or Playwright) selector (422)."""


class NavigationFailed(BrowserError):
    """The page could not be loaded: the browser's own net:: error (502)."""


class BrowserGone(BrowserError):
    """The browser died or could not be reached (crashed, never started)."""
