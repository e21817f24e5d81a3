from fastapi import APIRouter

from kiln.api.deps import Egress
from kiln.schemas.health import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(egress: Egress) -> HealthResponse:
    """Liveness: answers once the server accepts requests; no authentication.
    Says whether VMs here get networks (and if not, why)."""
    networking = egress.networking()
    return HealthResponse(networking=networking.mode, networking_reason=networking.reason)
