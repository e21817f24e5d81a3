"""Masking an injected credential out of what the service answers.

A service may echo what it received (a debugging endpoint, an error message
quoting the key): the guest must still never see the value. Every occurrence
in the response's headers and body becomes the same number of ``*``, so a
``Content-Length`` stays right. A body is scrubbed as it streams: the last
``len(secret) - 1`` bytes of each piece wait for the next, so an occurrence
split between two pieces is still caught. Only the value as sent is caught
(the proxy asks for uncompressed bodies for this); a service that transforms
it (base64, a fragment) is not.
"""

from __future__ import annotations

MASK = b"*"


def scrub(data: bytes, secret: bytes) -> bytes:
    if not secret:
        return data
    return data.replace(secret, MASK * len(secret))


class Scrubber:
    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` (after what was held) may go out now."""
        if not self.secret:
            return data
        data = scrub(self._held + data, self.secret)
        keep = len(self.secret) - 1
        if keep == 0:
            self._held = b""
            return data
        self._held = data[-keep:]
        return data[:-keep]

    def flush(self) -> bytes:
        """The held tail, at the end of the body."""
        held, self._held = self._held, b""
        return held
