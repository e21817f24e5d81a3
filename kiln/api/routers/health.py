from fastapi import APIRouter

from kiln.schemas.health import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> HealthResponse:
    """Liveness: answers once the server accepts requests; no authentication."""
    return HealthResponse()
