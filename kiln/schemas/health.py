from typing import Any

from pydantic import BaseModel


class DiskSpace(BaseModel):
    data_dir: str
    free_bytes: int
    total_bytes: int


class HealthResponse(BaseModel):
    status: str = "ok"
    # What this host gives VMs (absent before the server finished starting).
    accelerator: str | None = None
    confinement: dict[str, Any] | None = None
    networking: dict[str, Any] | None = None
    disk: DiskSpace | None = None
