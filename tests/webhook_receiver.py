"""A real HTTP receiver for webhook tests: a stdlib server on loopback in a thread.

It answers each request with the next status of its script (then 200) and
keeps what arrived (headers and the raw body), for the test to verify with the
instavm SDK's own ``webhooks.verify``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD = 0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    url: str
    # Statuses to answer, in order, then 200s; HOLD keeps the request open until ``release``.
    script: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)

    def answer_next(self) -> int:
        with self.lock:
            return self.script.pop(0) if self.script else 200

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        """The first ``count`` requests (fewer if they did not come within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)

    async def arrived(self, count: int, timeout: float = 60.0) -> list[Received]:
        """``wait_for`` for a test whose server runs in its own event loop."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return list(self.received)

    def of_type(self, event_type: str) -> list[Received]:
        return [item for item in self.received if item.headers.get("instavm-event-type") == event_type]


@contextmanager
def receiver(script: list[int] | None = None) -> Iterator[Receiver]:
    state: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = state.answer_next()
            if status == HOLD:
                state.holding.set()
                state.release.wait(120)
                status = 500
            headers = {name.lower(): value for name, value in self.headers.items()}
            with state.lock:
                state.received.append(Received(self.path, headers, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook", list(script or []))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
