"""Dependencies of the routers: the services and the authenticated user.

A protected route takes ``user: CurrentUser``; that alone documents both ways in
(the ``X-API-Key`` header and the ``OAuth2PasswordBearer`` scheme) in OpenAPI
and answers 401 with ``WWW-Authenticate: Bearer`` when neither works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import OAuth2PasswordBearer

from kiln.services.auth import AuthService
from kiln.services.errors import Unauthenticated
from kiln.services.users import UserService
from kiln.services.vms import VmService
from kiln.store.models import User

TOKEN_URL = "/v1/auth/token"

# auto_error=False: a request may authenticate with X-API-Key instead, so a
# missing bearer token is not an error by itself.
bearer_token = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)


@dataclass(frozen=True)
class Services:
    """What the app factory builds at start-up and routers depend on."""

    auth: AuthService
    users: UserService
    vms: VmService


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_vm_service(request: Request) -> VmService:
    return get_services(request).vms


def get_user_service(request: Request) -> UserService:
    return get_services(request).users


def get_auth_service(request: Request) -> AuthService:
    return get_services(request).auth


async def current_user(
    auth: Annotated[AuthService, Depends(get_auth_service)],
    token: Annotated[str | None, Depends(bearer_token)],
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
) -> User:
    # Either header may carry either credential: the instavm SDK sends its API key
    # as X-API-Key, curl users often send it as a bearer token.
    credential = x_api_key or token
    if not credential:
        raise Unauthenticated("not authenticated: send X-API-Key or Authorization: Bearer")
    return await auth.authenticate(credential)


CurrentUser = Annotated[User, Depends(current_user)]
Vms = Annotated[VmService, Depends(get_vm_service)]
Users = Annotated[UserService, Depends(get_user_service)]
Auth = Annotated[AuthService, Depends(get_auth_service)]
