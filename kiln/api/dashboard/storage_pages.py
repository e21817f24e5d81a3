"""The user's vaults and volumes: listed, and made from the dashboard.

A vault shows its credentials by name and type and its services by host:
never a value. A credential's value goes in through a password field and is
sealed by the service; no page ever shows it back.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard import forms
from kiln.api.dashboard.scope import scope_of
from kiln.api.dashboard.web import Actor, DashboardRoute, PageError, Viewer, page, redirect
from kiln.schemas.vaults import CredentialCreateRequest, ServiceCreateRequest, VaultCreateRequest
from kiln.schemas.volumes import VolumeCreateRequest

router = APIRouter(prefix="/ui", route_class=DashboardRoute, include_in_schema=False)
MIB = 1024 * 1024


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


@router.post("/vaults")
async def create_vault(request: Request, who: Actor) -> Response:
    form = await request.form()
    body = VaultCreateRequest(name=forms.text(form, "name"), description=forms.text(form, "description") or None)
    await who.services.vaults.create(who.user.id, body.name, body.description)
    return redirect("/ui/vaults")


@router.post("/vaults/{vault_id}/credentials")
async def add_credential(request: Request, vault_id: str, who: Actor) -> Response:
    form = await request.form()
    value = form.get("value")
    body = CredentialCreateRequest(
        name=forms.text(form, "name"),
        value=value if isinstance(value, str) else "",
        credential_type=forms.text(form, "credential_type") or "api_key",
    )
    await who.services.vaults.add_credential(
        who.user.id, vault_id, body.name, body.value, body.credential_type, body.description
    )
    return redirect(f"/ui/vaults#vault-{vault_id}")


@router.post("/vaults/{vault_id}/services")
async def add_service(request: Request, vault_id: str, who: Actor) -> Response:
    """A host whose requests get a credential as a bearer token (other schemes: the API)."""
    form = await request.form()
    credential = forms.text(form, "credential")
    if not credential:
        raise PageError("credential: name the credential this host's requests carry", 422)
    body = ServiceCreateRequest(host=forms.text(form, "host"), auth_config={"type": "bearer", "token": credential})
    await who.services.vaults.add_service(who.user.id, vault_id, body.host, body.auth_config, True, None)
    return redirect(f"/ui/vaults#vault-{vault_id}")


@router.get("/volumes")
async def volumes_page(request: Request, who: Viewer) -> Response:
    scope = await scope_of(request, who)
    volumes = [
        {"volume": volume, "owner": owner}
        for owner in scope.owners
        for volume, _ in await who.services.volumes.list(owner.id)
    ]
    return page(request, "volumes.html", {"volumes": volumes, "scope": scope})


@router.post("/volumes")
async def create_volume(request: Request, who: Actor) -> Response:
    form = await request.form()
    size_mib = forms.optional_int(form, "size_mib", "size")
    if size_mib is None:
        raise PageError("size: give the volume's size in MiB", 422)
    body = VolumeCreateRequest(name=forms.text(form, "name"), quota_bytes=size_mib * MIB)
    await who.services.volumes.create(who.user.id, body)
    return redirect("/ui/volumes")
