from fastapi import APIRouter

from kiln.api.deps import CurrentUser
from kiln.schemas.auth import UserResponse
from kiln.schemas.errors import ErrorMessage

router = APIRouter(prefix="/v1/users", tags=["users"], responses={401: {"model": ErrorMessage}})


@router.get("/me")
async def read_me(user: CurrentUser) -> UserResponse:
    return UserResponse(id=user.id, username=user.username, name=user.username, created_at=user.created_at)
