"""Dependencies of the routers: the services and the authenticated user.

A protected route takes ``user: CurrentUser``; that alone documents both ways in
(the ``X-API-Key`` header and the ``OAuth2PasswordBearer`` scheme) in OpenAPI
and answers 401 with ``WWW-Authenticate: Bearer`` when neither works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import OAuth2PasswordBearer

from kiln.api.call_log import note_user
from kiln.api.metrics import Metrics
from kiln.services.auth import AuthService
from kiln.services.browser import BrowserService
from kiln.services.domains.service import DomainService
from kiln.services.egress import EgressService
from kiln.services.errors import Unauthenticated
from kiln.services.events.audit import AuditService
from kiln.services.events.calls import CallLog
from kiln.services.execution import ExecutionService
from kiln.services.files import FileService
from kiln.services.guest import GuestTarget, session_target, vm_target
from kiln.services.pty import PtyService
from kiln.services.sessions import SessionService
from kiln.services.shares.service import ShareService
from kiln.services.snapshots.builds import ImageBuilder
from kiln.services.snapshots.oci_import import ImageImporter
from kiln.services.snapshots.service import SnapshotService
from kiln.services.snapshots.system import SystemSnapshots
from kiln.services.snapshots.system_builds import SystemBuilds
from kiln.services.ssh_keys import SshKeyService
from kiln.services.staged_env import StagedEnv
from kiln.services.usage import UsageService
from kiln.services.users import UserService
from kiln.services.vault_calls import VaultCallLog
from kiln.services.vaults import VaultService
from kiln.services.vms import VmService
from kiln.services.volumes.files import VolumeFileService
from kiln.services.volumes.mounts import VolumeMounts
from kiln.services.volumes.service import VolumeService
from kiln.services.webhooks.service import WebhookService
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
    sessions: SessionService
    execution: ExecutionService
    files: FileService
    pty: PtyService
    snapshots: SnapshotService
    importer: ImageImporter
    builder: ImageBuilder
    shares: ShareService
    domains: DomainService
    ssh_keys: SshKeyService
    audit: AuditService
    webhooks: WebhookService
    metrics: Metrics
    usage: UsageService
    calls: CallLog
    egress: EgressService
    volumes: VolumeService
    volume_files: VolumeFileService
    mounts: VolumeMounts
    vaults: VaultService
    vault_calls: VaultCallLog
    system_snapshots: SystemSnapshots
    system_builds: SystemBuilds
    browser: BrowserService
    # The SSH gateway's address as VM records name it (None: no gateway).
    ssh: tuple[str, int] | None = None
    # Values staged for a VM's next command; the same object the execution and
    # terminal services take them from.
    staged_env: StagedEnv = field(default_factory=StagedEnv)


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
    return await user_from_credentials(auth, x_api_key, token)


async def user_from_credentials(auth: AuthService, *candidates: str | None) -> User:
    """The user of the first credential given, for routes that also take one outside
    the headers: the body of POST /v1/sessions/session, a WebSocket's ?api_key=."""
    credential = next((candidate for candidate in candidates if candidate), None)
    if credential is None:
        raise Unauthenticated("not authenticated: send X-API-Key or Authorization: Bearer")
    user = await auth.authenticate(credential)
    note_user(user.id)  # for this request's api.call event
    return user


def get_session_service(request: Request) -> SessionService:
    return get_services(request).sessions


def get_execution_service(request: Request) -> ExecutionService:
    return get_services(request).execution


def get_file_service(request: Request) -> FileService:
    return get_services(request).files


def get_pty_service(request: Request) -> PtyService:
    return get_services(request).pty


def get_staged_env(request: Request) -> StagedEnv:
    return get_services(request).staged_env


def get_snapshot_service(request: Request) -> SnapshotService:
    return get_services(request).snapshots


def get_importer(request: Request) -> ImageImporter:
    return get_services(request).importer


def get_builder(request: Request) -> ImageBuilder:
    return get_services(request).builder


def get_system_snapshots(request: Request) -> SystemSnapshots:
    return get_services(request).system_snapshots


def get_system_builds(request: Request) -> SystemBuilds:
    return get_services(request).system_builds


def get_share_service(request: Request) -> ShareService:
    return get_services(request).shares


def get_domain_service(request: Request) -> DomainService:
    return get_services(request).domains


def get_ssh_key_service(request: Request) -> SshKeyService:
    return get_services(request).ssh_keys


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def ssh_endpoint(request: Request) -> tuple[str, int] | None:
    """The SSH gateway as a client reaches it: KILN_SSH_HOST, else the API's host;
    a wildcard listen address is replaced by the host this request came to."""
    ssh = get_services(request).ssh
    if ssh is None:
        return None
    host, port = ssh
    if host in WILDCARD_HOSTS:
        host = request.url.hostname or host
    return host, port


def get_egress_service(request: Request) -> EgressService:
    return get_services(request).egress


def get_volume_service(request: Request) -> VolumeService:
    return get_services(request).volumes


def get_volume_files(request: Request) -> VolumeFileService:
    return get_services(request).volume_files


def get_mounts(request: Request) -> VolumeMounts:
    return get_services(request).mounts


CurrentUser = Annotated[User, Depends(current_user)]
Domains = Annotated[DomainService, Depends(get_domain_service)]
SshKeys = Annotated[SshKeyService, Depends(get_ssh_key_service)]
SshEndpoint = Annotated[tuple[str, int] | None, Depends(ssh_endpoint)]
Shares = Annotated[ShareService, Depends(get_share_service)]
def get_vault_service(request: Request) -> VaultService:
    return get_services(request).vaults


def get_vault_calls(request: Request) -> VaultCallLog:
    return get_services(request).vault_calls


Vaults = Annotated[VaultService, Depends(get_vault_service)]
VaultCalls = Annotated[VaultCallLog, Depends(get_vault_calls)]
Sessions = Annotated[SessionService, Depends(get_session_service)]
Execution = Annotated[ExecutionService, Depends(get_execution_service)]
Files = Annotated[FileService, Depends(get_file_service)]
Ptys = Annotated[PtyService, Depends(get_pty_service)]
Staged = Annotated[StagedEnv, Depends(get_staged_env)]
Snapshots = Annotated[SnapshotService, Depends(get_snapshot_service)]
Importer = Annotated[ImageImporter, Depends(get_importer)]
Builder = Annotated[ImageBuilder, Depends(get_builder)]
SystemSnapshotsDep = Annotated[SystemSnapshots, Depends(get_system_snapshots)]
SystemBuildsDep = Annotated[SystemBuilds, Depends(get_system_builds)]
Egress = Annotated[EgressService, Depends(get_egress_service)]
VolumeServiceDep = Annotated[VolumeService, Depends(get_volume_service)]
VolumeFiles = Annotated[VolumeFileService, Depends(get_volume_files)]
Mounts = Annotated[VolumeMounts, Depends(get_mounts)]

Vms = Annotated[VmService, Depends(get_vm_service)]


def get_usage_service(request: Request) -> UsageService:
    return get_services(request).usage


Ledger = Annotated[UsageService, Depends(get_usage_service)]
Users = Annotated[UserService, Depends(get_user_service)]
Auth = Annotated[AuthService, Depends(get_auth_service)]


async def session_guest(session_id: str, user: CurrentUser, vms: Vms) -> GuestTarget:
    """The running VM of the route's ``{session_id}`` (404 unknown, 409 not running)."""
    return await session_target(vms, user.id, session_id)


async def vm_guest(vm_id: str, user: CurrentUser, vms: Vms) -> GuestTarget:
    """The running VM ``{vm_id}`` of the route (404 unknown, 409 not running)."""
    return await vm_target(vms, user.id, vm_id)


SessionGuest = Annotated[GuestTarget, Depends(session_guest)]
VmGuest = Annotated[GuestTarget, Depends(vm_guest)]
