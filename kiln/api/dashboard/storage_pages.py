"""Read-only pages of the user's vaults and volumes.

A vault shows its credentials by name and type and its services by host:
never a value (the services never open a sealed one for this process anyway).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard.web import DashboardRoute, Viewer, page

router = APIRouter(prefix="/ui", route_class=DashboardRoute, include_in_schema=False)


@router.get("/vaults")
async def vaults_page(request: Request, who: Viewer) -> Response:
    vaults = who.services.vaults
    shown: list[dict[str, Any]] = []
    for vault in await vaults.list_vaults(who.user.id):
        shown.append(
            {
                "vault": vault,
                "credentials": [
                    {"name": c.name, "type": c.credential_type}
                    for c in await vaults.list_credentials(who.user.id, vault.id)
                ],
                "services": await vaults.list_services(who.user.id, vault.id),
            }
        )
    return page(request, "vaults.html", {"vaults": shown})


@router.get("/volumes")
async def volumes_page(request: Request, who: Viewer) -> Response:
    volumes = [volume for volume, _ in await who.services.volumes.list(who.user.id)]
    return page(request, "volumes.html", {"volumes": volumes})
