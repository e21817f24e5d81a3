from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm

from kiln.api.deps import TOKEN_URL, Auth
from kiln.schemas.auth import TokenResponse
from kiln.schemas.errors import ErrorMessage

router = APIRouter(tags=["auth"])


@router.post(TOKEN_URL, responses={401: {"model": ErrorMessage}})
async def issue_token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], auth: Auth
) -> TokenResponse:
    """OAuth2 password flow: a bearer token for a username and password."""
    return TokenResponse(access_token=await auth.login(form.username, form.password))
