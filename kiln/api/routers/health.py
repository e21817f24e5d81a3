import asyncio
import shutil

from fastapi import APIRouter, Request

from kiln.schemas.health import DiskSpace, HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> HealthResponse:
    """Liveness: answers once the server accepts requests; no authentication.
    Says what the host gives VMs: the accelerator, how QEMU is confined, whether
    guests get networks, and the data dir's free space."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        return HealthResponse()
    vms = services.vms
    data_dir = vms.data_dir.resolve()
    usage = await asyncio.to_thread(shutil.disk_usage, data_dir)
    return HealthResponse(
        **vms.node.health(),
        disk=DiskSpace(data_dir=str(data_dir), free_bytes=usage.free, total_bytes=usage.used + usage.free),
    )
