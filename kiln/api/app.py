"""The application factory.

``create_app(settings)`` wires the real runtime (QEMU, the image store); tests
pass their own ``hypervisor`` and ``images``. Start-up (the lifespan) opens the
database, migrates it to the newest schema, creates ``admin`` and its first API
key on the very first start, and starts the VM service, which adopts the VMs an
earlier server left running. Shutdown stops the background loops and leaves
running VMs alone, for the next start to adopt.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI

from kiln.api.call_log import ApiCalls
from kiln.api.custom_domains import start_domains
from kiln.api.dashboard import install_dashboard
from kiln.api.deps import Services
from kiln.api.errors import install_error_handlers
from kiln.api.limits import MULTIPART_OVERHEAD_BYTES, BodySizeLimit
from kiln.api.metrics import Metrics, PrometheusTelemetry
from kiln.api.request_ids import RequestIds
from kiln.api.routers import (
    api_keys,
    audit,
    auth,
    browser,
    egress,
    execution,
    files,
    health,
    metrics,
    pty,
    sessions,
    shares,
    snapshots,
    ssh_keys,
    stage_env,
    usage,
    users,
    vaults,
    vms,
    volumes,
    webhooks,
)
from kiln.api.routers.domains import router as domains_router
from kiln.api.sharing import start_sharing
from kiln.api.ssh import start_ssh_gateway
from kiln.api.unavailable import install_refusals
from kiln.api.webhooks import start_webhooks
from kiln.config import Settings
from kiln.runtime.driver import Hypervisor
from kiln.schemas.errors import ValidationError
from kiln.services.auth import ApiKeyCache, AuthService, load_or_create_secret
from kiln.services.browser import BrowserService
from kiln.services.cache_prune import CachePrune
from kiln.services.egress import EgressService
from kiln.services.events.audit import AuditService
from kiln.services.events.calls import CallLog
from kiln.services.execution import ExecutionService
from kiln.services.files import FileService
from kiln.services.host_stats import HostStats
from kiln.services.pty import PtyService
from kiln.services.retention import Retention
from kiln.services.sessions import SessionService
from kiln.services.ssh_keys import SshKeyService
from kiln.services.staged_env import StagedEnv
from kiln.services.usage import Prices, UsageService
from kiln.services.users import UserService
from kiln.services.vms import ImageSource
from kiln.services.wiring import build_vm_services
from kiln.store.db import Database

log = logging.getLogger(__name__)

ADMIN_KEY_FILE = "admin-api-key"
# A volume's file upload takes as much as POST /upload.
VOLUME_UPLOAD_PATH = re.compile(r"/v1/volumes/[^/]+/files/upload")
# So does the dashboard's upload form (its POST; a GET of that path is a download).
DASHBOARD_UPLOAD_PATH = re.compile(r"/ui/vms/[^/]+/files")
TOKEN_SECRET_FILE = "token-secret"


NUMERIC_BOUND_KEYS = frozenset(
    {"maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf"}
)


def _integral_bounds(node: Any) -> Any:
    """Print integral numeric bounds as integers (65535, not 65535.0).

    FastAPI's OpenAPI models type these keys as float; pydantic and the seed
    print integer bounds of integer fields as integers.
    """
    if isinstance(node, dict):
        return {
            key: int(value)
            if key in NUMERIC_BOUND_KEYS and isinstance(value, float) and value.is_integer()
            else _integral_bounds(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_integral_bounds(item) for item in node]
    return node


class KilnApi(FastAPI):
    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = _integral_bounds(super().openapi())
            # FastAPI documents `input` and `ctx` in its ValidationError; Kiln never
            # sends them (see kiln.schemas.errors), and the seed's shape lacks them.
            schema["components"]["schemas"]["ValidationError"] = (
                ValidationError.model_json_schema()
            )
            self.openapi_schema = schema
        return self.openapi_schema


def create_app(
    settings: Settings,
    hypervisor: Hypervisor | None = None,
    images: ImageSource | None = None,
) -> FastAPI:
    if hypervisor is None:
        # Imported here so the API layer loads without the QEMU runtime (tests inject fakes).
        from kiln.runtime.qemu import QemuHypervisor

        hypervisor = QemuHypervisor(settings)
    if images is None:
        from kiln.runtime.images import ImageStore

        images = ImageStore(settings)
    runtime: tuple[Hypervisor, ImageSource] = (hypervisor, images)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database)
        try:
            await db.migrate()
            # First: an unusable secret stops the start before anything is made.
            token_secret = load_or_create_secret(settings.data_dir / TOKEN_SECRET_FILE)
            key_cache = ApiKeyCache()
            user_service = UserService(db, key_cache)
            await _bootstrap_admin(user_service, settings)
            auth_service = AuthService(db, token_secret, settings.token_ttl_seconds, key_cache)
            vm_side = build_vm_services(settings, db, *runtime)
            await vm_side.start()
            vm_service = vm_side.vms
            staged_env = StagedEnv()
            execution_service = ExecutionService(vm_service, db, staged_env)
            await execution_service.start()
            sharing = await start_sharing(settings, db, vm_service)
            domain_service = await start_domains(settings, db, vm_service)
            ssh = await start_ssh_gateway(settings, vm_service)
            audit_service = AuditService(db)
            retention = Retention(db, settings.events_retention_days, settings.rows_retention_days)
            retention.start()
            cache_prune = CachePrune(settings, db)
            cache_prune.start()
            telemetry = PrometheusTelemetry()
            vm_service.telemetry = telemetry
            webhook_service = start_webhooks(settings, db, telemetry.webhook_outcome)
            calls = CallLog(db)
            calls.start()
            browser_service = BrowserService(vm_service, settings)
            app.state.services = Services(
                auth=auth_service,
                users=user_service,
                vms=vm_service,
                sessions=SessionService(vm_service),
                execution=execution_service,
                files=FileService(vm_service, settings.max_upload_bytes, settings.max_download_bytes),
                pty=PtyService(staged_env),
                snapshots=vm_service.snapshots,
                importer=vm_side.importer,
                builder=vm_side.builder,
                shares=sharing.shares,
                domains=domain_service,
                ssh_keys=SshKeyService(db),
                audit=audit_service,
                webhooks=webhook_service,
                metrics=Metrics(telemetry, HostStats(db, vm_service.node, vm_service.pool), settings.metrics_token),
                usage=UsageService(
                    db,
                    Prices(
                        settings.usage_dollars_per_vcpu_hour,
                        settings.usage_dollars_per_gib_hour,
                        settings.usage_dollars_per_disk_gib_hour,
                    ),
                ),
                calls=calls,
                ssh=(settings.ssh_listen_host, settings.ssh_port) if settings.ssh_gateway else None,
                egress=EgressService(vm_service),
                volumes=vm_side.volumes,
                volume_files=vm_side.volume_files,
                mounts=vm_side.mounts,
                vaults=vm_side.vaults,
                vault_calls=vm_side.vault_calls,
                system_snapshots=vm_side.system_snapshots,
                system_builds=vm_side.system_builds,
                browser=browser_service,
                staged_env=staged_env,
            )
            try:
                yield
            finally:
                await browser_service.stop()
                await calls.stop()
                await webhook_service.worker.stop()
                await cache_prune.stop()
                await retention.stop()
                await domain_service.worker.stop()
                await ssh.stop()
                await sharing.stop()
                await execution_service.stop()
                await vm_side.stop()
        finally:
            await db.close()

    app = KilnApi(
        title="Kiln",
        version=version("kiln"),
        description="Self-hosted microVM sandboxes with an InstaVM-compatible API.",
        lifespan=lifespan,
        # GET /v1/vms and GET /v1/vms/ are different routes (live vs. all VMs).
        redirect_slashes=False,
    )
    install_error_handlers(app)
    upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_request_bytes,
        limits_by_path={"/upload": upload_limit},
        limits_by_pattern=[(VOLUME_UPLOAD_PATH, upload_limit), (DASHBOARD_UPLOAD_PATH, upload_limit)],
    )
    # Outside the body limit: a refused oversized call is recorded too.
    app.add_middleware(ApiCalls)
    # Added last, so outermost: every answer (the body limit's 413s too) carries the id.
    app.add_middleware(RequestIds)
    for module in (health, auth, users, api_keys, vms, sessions, execution, files, pty, volumes):
        app.include_router(module.router)
    app.include_router(snapshots.router)
    app.include_router(shares.router)
    app.include_router(domains_router)
    app.include_router(ssh_keys.router)
    app.include_router(audit.router)
    app.include_router(webhooks.router)
    app.include_router(metrics.router)
    app.include_router(usage.router)
    app.include_router(egress.router)
    app.include_router(vaults.router)
    app.include_router(stage_env.router)
    app.include_router(browser.router)
    install_dashboard(app, settings)
    # Last: it answers only where no route above (or added later) has the path.
    install_refusals(app)
    return app


async def _bootstrap_admin(users: UserService, settings: Settings) -> None:
    key_file = settings.data_dir / ADMIN_KEY_FILE
    key = await users.bootstrap_admin(key_file)
    if key is not None:
        # Printed, not logged: this is the one time the key is shown.
        print(
            f"Created user 'admin'. Its API key (shown once; also in {key_file}):\n{key}",
            flush=True,
        )
