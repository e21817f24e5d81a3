"""The two control sockets between the share router and the server: JSON lines.

- ``router/router.sock``, served by the router: ``ping`` (the supervisor's
  liveness check), ``reload`` (certificates of custom domains changed).
- ``router/server.sock``, served by ``kiln serve``: ``wake`` (resume a VM with
  ``auto_resume``; answered once it runs) and ``activity`` (VMs that had share
  traffic). The router never touches QEMU; the server never parses HTTP for it.

One request per connection: a JSON object on a line, a JSON object back
(``kiln.net.feed.request`` is the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln.net.feed import MAX_CONTROL_LINE
from kiln.net.feed import request as ask

__all__ = ["ControlServer", "ask"]

log = logging.getLogger(__name__)

Handler = Callable[[dict], Awaitable[dict]]
READ_SECONDS = 5.0


class ControlServer:
    """A unix socket (0600) answering each request line with ``handler``'s answer."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_CONTROL_LINE)
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_SECONDS)
            message = json.loads(line or b"{}")
            answer = await self._handler(message) if isinstance(message, dict) else {"ok": False}
        except (ValueError, TimeoutError, ConnectionError) as error:
            answer = {"ok": False, "error": str(error)}
        except Exception as error:  # a handler's bug must not kill the socket
            log.exception("control request failed")
            answer = {"ok": False, "error": str(error) or type(error).__name__}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()
