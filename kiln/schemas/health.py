from pydantic import BaseModel


class HealthResponse(BaseModel):
    status: str = "ok"
    # Guest networking on this host: "filtered" (every VM gets a network its
    # egress policy filters) or "off" (VMs get no network at all; the reason says why).
    networking: str
    networking_reason: str | None = None
