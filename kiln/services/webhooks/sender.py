"""One signed POST to an endpoint, and what came of it (never raises)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import httpx

from kiln.services.webhooks.policy import UnsafeAddress, check_destination
from kiln.services.webhooks.signing import SIGNATURE_HEADER, body_bytes, signature
from kiln.store.models import utc_now

USER_AGENT = f"Kiln-Webhooks/{version('kiln')}"
# What is kept of a receiver's error text or an exception's message.
MAX_ERROR_CHARS = 500
ANSWER_EXCERPT_BYTES = 200


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def as_row(self) -> dict[str, Any]:
        return {
            "at": utc_now().isoformat(),
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 1),
        }


def new_client() -> httpx.AsyncClient:
    # No redirects (a 3xx is an answer, not a new destination to check), no
    # proxies or certificates from the environment: the server's own settings only.
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT})


async def send(
    http: httpx.AsyncClient,
    url: str,
    secret: str,
    event: dict[str, Any],
    *,
    delivery_id: str,
    timeout: float,
    allow_private: bool,
) -> Attempt:
    started = time.monotonic()

    def elapsed() -> float:
        return (time.monotonic() - started) * 1000

    try:
        await check_destination(url, allow_private)
    except UnsafeAddress as error:
        return Attempt(None, str(error)[:MAX_ERROR_CHARS], elapsed())
    body = body_bytes(event)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, int(time.time()), body),
        "InstaVM-Event-Type": str(event.get("event_type", "")),
        "InstaVM-Event-Id": str(event.get("id", "")),
        "InstaVM-Delivery-Id": delivery_id,
    }
    try:
        # Streamed: only the first bytes of a receiver's answer are read, whatever it sends.
        # httpx's timeout is per read; the outer one bounds a receiver that trickles.
        async with (
            asyncio.timeout(timeout),
            http.stream("POST", url, content=body, headers=headers, timeout=timeout) as answer,
        ):
            if 200 <= answer.status_code < 300:
                return Attempt(answer.status_code, None, elapsed())
            start = b""
            async for chunk in answer.aiter_raw():
                start += chunk
                if len(start) >= ANSWER_EXCERPT_BYTES:
                    break
            excerpt = start[:ANSWER_EXCERPT_BYTES].decode(errors="replace")
            return Attempt(answer.status_code, f"HTTP {answer.status_code}: {excerpt}", elapsed())
    except (httpx.TimeoutException, TimeoutError):
        return Attempt(None, f"no answer within {timeout:g} s", elapsed())
    except httpx.HTTPError as error:
        return Attempt(None, f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS], elapsed())
