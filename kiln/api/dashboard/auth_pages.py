"""Signing in (username and password, or an API key) and out."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard.session import COOKIE_NAME, LOGIN_COOKIE_NAME, SESSION_SECONDS, tokens_match
from kiln.api.dashboard.web import CSRF_FIELD, Actor, DashboardRoute, PageError, page, redirect, session_store
from kiln.api.deps import get_services
from kiln.services.errors import Unauthenticated

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)
LOGIN_FORM_SECONDS = 3600


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


@router.get("/")
async def root() -> Response:
    return redirect("/ui/")


@router.get("/ui/login")
async def login_page(request: Request) -> Response:
    token = secrets.token_urlsafe(32)
    response = page(request, "login.html", {"login_token": token})
    _set_cookie(request, response, LOGIN_COOKIE_NAME, token, LOGIN_FORM_SECONDS)
    return response


@router.post("/ui/login")
async def sign_in(request: Request) -> Response:
    form = await request.form()
    if not tokens_match(str(form.get(CSRF_FIELD) or ""), request.cookies.get(LOGIN_COOKIE_NAME) or ""):
        raise PageError("the sign-in form has expired; reload the page and try again", 403)
    username = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    api_key = str(form.get("api_key") or "").strip()
    auth = get_services(request).auth
    try:
        if api_key:
            user = await auth.authenticate(api_key)
        elif username and password:
            # The OAuth2 password flow's check; the bearer token it makes is only read here.
            user = await auth.authenticate(await auth.login(username, password))
        else:
            raise PageError("give a username and password, or an API key", 400)
    except Unauthenticated:
        token = secrets.token_urlsafe(32)
        failed = {"login_token": token, "error": "Sign-in failed: wrong username, password or API key."}
        response = page(request, "login.html", {**failed, "username": username}, 401)
        _set_cookie(request, response, LOGIN_COOKIE_NAME, token, LOGIN_FORM_SECONDS)
        return response
    _, cookie = session_store(request).create(user.id)
    response = redirect("/ui/")
    _set_cookie(request, response, COOKIE_NAME, cookie, SESSION_SECONDS)
    response.delete_cookie(LOGIN_COOKIE_NAME, path="/")
    return response


@router.post("/ui/logout")
async def sign_out(request: Request, who: Actor) -> Response:
    session_store(request).end(who.session.session_id)
    response = redirect("/ui/login")
    response.delete_cookie(COOKIE_NAME, path="/")
    return response
