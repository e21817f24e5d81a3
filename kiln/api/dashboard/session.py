"""Dashboard sign-ins: server-side sessions behind a signed, HttpOnly cookie.

A session is a row in this process's memory: the user, a CSRF token and an
absolute expiry. The cookie carries only the session's random id and an HMAC of
it (so a forged or altered cookie is refused without a lookup); the expiry is
the server's, never the cookie's. Signing out, or the server restarting,
ends every session of it: the user signs in again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE_NAME = "kiln_session"
# The login form's own CSRF token (a double-submit cookie: there is no session yet).
LOGIN_COOKIE_NAME = "kiln_login_csrf"
SESSION_SECONDS = 8 * 3600
# Sessions are few (people, not programs); the cap keeps a flood of sign-ins bounded.
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class DashboardSession:
    session_id: str
    user_id: int
    csrf_token: str
    expires_at: float


class SessionStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic, lifetime: float = SESSION_SECONDS) -> None:
        # Per process: the sessions live in this process's memory, so does their key.
        self._key = secrets.token_bytes(32)
        self._clock = clock
        self._lifetime = lifetime
        self._sessions: dict[str, DashboardSession] = {}

    def create(self, user_id: int) -> tuple[DashboardSession, str]:
        """A new session and the cookie value that names it."""
        self._drop_expired()
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda s: s.expires_at)
            del self._sessions[oldest.session_id]
        session = DashboardSession(
            session_id=secrets.token_urlsafe(32),
            user_id=user_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=self._clock() + self._lifetime,
        )
        self._sessions[session.session_id] = session
        return session, f"{session.session_id}.{self._sign(session.session_id)}"

    def get(self, cookie: str | None) -> DashboardSession | None:
        """The live session a cookie names; None for a missing, forged or expired one."""
        if not cookie or "." not in cookie:
            return None
        session_id, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(session_id)):
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _sign(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode(), hashlib.sha256).hexdigest()

    def _drop_expired(self) -> None:
        now = self._clock()
        for session_id in [s.session_id for s in self._sessions.values() if s.expires_at <= now]:
            del self._sessions[session_id]


def tokens_match(given: str | None, expected: str) -> bool:
    """A CSRF check in constant time."""
    return bool(given) and hmac.compare_digest(str(given), expected)
