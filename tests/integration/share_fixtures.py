"""What the share tests and the bench share: the guest web app started in a VM,
and clients that reach a share through the router by its Host header."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
from live_api import Api, wait_until

# The same app the bench runs (bench/guest_web_app.py).
APP = Path(__file__).parents[2] / "bench" / "guest_web_app.py"
APP_PORT = 8000
PATTERN = bytes(i % 251 for i in range(251 * 1024))


def start_app(api: Api, session_id: str, port: int = APP_PORT) -> None:
    """Start guest_web_app.py in the session's VM, listening on ``port``."""
    encoded = base64.b64encode(APP.read_bytes()).decode()
    api.run(
        session_id,
        f"python3 -c \"import base64,sys; open('/tmp/app.py','wb').write(base64.b64decode(sys.argv[1]))\" {encoded}"
        f" && (nohup python3 /tmp/app.py {port} >/tmp/app.log 2>&1 &)",
    )
    probe = f"python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/hello')\""
    assert wait_until(lambda: _exit_code(api, session_id, probe) == 0, 60), "the guest app did not start"


def _exit_code(api: Api, session_id: str, command: str) -> int:
    answer = api.http.post("/execute", json={"session_id": session_id, "command": command, "language": "bash"})
    return int(answer.json().get("exit_code", 1))


def host_of(share: dict) -> str:
    """The Host header of a share's URL (``<id>.<domain>:<port>``)."""
    return httpx.URL(share["url"]).netloc.decode()


def pattern_bytes(size: int) -> Iterator[bytes]:
    """What the app's /bytes/<size> sends, in the same pieces."""
    while size:
        piece = PATTERN[: min(size, len(PATTERN))]
        size -= len(piece)
        yield piece


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern_bytes(size):
        digest.update(piece)
    return digest.hexdigest()
