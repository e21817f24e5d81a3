"""What every dashboard route shares: templates, the signed-in user, CSRF checks,
security headers and turning refusals into pages (4xx, never a 500)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from kiln.api.dashboard.session import COOKIE_NAME, DashboardSession, SessionStore, tokens_match
from kiln.api.deps import Services, get_services
from kiln.api.errors import STATUS_BY_ERROR
from kiln.services.errors import InvalidRequest, NotFound, ServiceError

if TYPE_CHECKING:
    from kiln.store.models import User

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
LOGIN_PATH = "/ui/login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class SignInRequired(Exception):
    """No live dashboard session: the browser is sent to the sign-in page."""


class PageError(Exception):
    """Input the dashboard refuses, shown to the user with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def session_store(request: Request) -> SessionStore:
    return request.app.state.dashboard_sessions


@dataclass(frozen=True)
class SignedIn:
    user: User
    session: DashboardSession
    services: Services


async def signed_in(request: Request) -> SignedIn:
    session = session_store(request).get(request.cookies.get(COOKIE_NAME))
    if session is None:
        raise SignInRequired()
    services = get_services(request)
    try:
        user = await services.users.get_user(session.user_id)
    except NotFound:
        # The user was removed while signed in.
        session_store(request).end(session.session_id)
        raise SignInRequired() from None
    request.state.dashboard_session = session
    request.state.dashboard_user = user
    return SignedIn(user, session, services)


async def checked(request: Request, who: Annotated[SignedIn, Depends(signed_in)]) -> SignedIn:
    """A signed-in user whose unsafe request carries the session's CSRF token
    (a form field, or the header the page's scripts send)."""
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        given = str((await request.form()).get(CSRF_FIELD) or "")
    if not tokens_match(given, who.session.csrf_token):
        raise PageError("the form has expired or did not come from this dashboard; reload the page and try again", 403)
    return who


Viewer = Annotated[SignedIn, Depends(signed_in)]
Actor = Annotated[SignedIn, Depends(checked)]


def page(request: Request, name: str, context: Mapping[str, Any] | None = None, status: int = 200) -> Response:
    session: DashboardSession | None = getattr(request.state, "dashboard_session", None)
    values = {
        "csrf_token": session.csrf_token if session else "",
        "nonce": nonce(request),
        # The header's navigation, on every page of a signed-in user (error pages too).
        "user": getattr(request.state, "dashboard_user", None),
        **(context or {}),
    }
    return templates.TemplateResponse(request, name, values, status_code=status)


def redirect(path: str) -> RedirectResponse:
    # 303: the browser follows a form's POST with a GET (no resubmission on reload).
    return RedirectResponse(path, status_code=303)


def nonce(request: Request) -> str:
    """This response's CSP nonce for style elements (xterm.js makes its own)."""
    value = getattr(request.state, "csp_nonce", None)
    if value is None:
        value = request.state.csp_nonce = secrets.token_urlsafe(16)
    return value


def security_headers(request: Request, response: Response) -> None:
    host = request.headers.get("host", "")
    # No inline script anywhere; styles inline only with this response's nonce.
    response.headers["Content-Security-Policy"] = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            f"style-src 'self' 'nonce-{nonce(request)}'",
            "img-src 'self'",
            "font-src 'self'",
            f"connect-src 'self' ws://{host} wss://{host}",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")


def refusal(request: Request, error: Exception) -> Response:
    """A page (or, for htmx, a fragment) saying why; the status says it too."""
    if isinstance(error, SignInRequired):
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": LOGIN_PATH})
        return redirect(LOGIN_PATH)
    if isinstance(error, ServiceError):
        status = next((code for kind, code in STATUS_BY_ERROR.items() if isinstance(error, kind)), 400)
        if isinstance(error, InvalidRequest):
            status = 422
        message = str(error)
    elif isinstance(error, PageError):
        status, message = error.status, str(error)
    elif isinstance(error, RequestValidationError | ValidationError):
        status, message = 422, _validation_message(error)
    else:  # pragma: no cover - the route class only passes the kinds above
        raise error
    if request.headers.get("hx-request"):
        return Response(message, status_code=status, media_type="text/plain")
    return page(request, "error.html", {"message": message, "status": status}, status)


def _validation_message(error: RequestValidationError | ValidationError) -> str:
    # Field names and messages, never the input (it may be a secret).
    parts = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path"))
        parts.append(f"{loc}: {item.get('msg', 'invalid')}" if loc else str(item.get("msg", "invalid")))
    return "; ".join(parts) or "invalid input"


class DashboardRoute(APIRoute):
    """Every dashboard answer gets the security headers, and a refusal becomes a page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        answer = super().get_route_handler()

        async def answer_as_page(request: Request) -> Response:
            try:
                response = await answer(request)
            except (SignInRequired, PageError, ServiceError, RequestValidationError, ValidationError) as error:
                response = refusal(request, error)
            security_headers(request, response)
            return response

        return answer_as_page
