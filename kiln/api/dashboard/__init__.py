"""The web dashboard at ``/`` (``/ui/...``): server-rendered pages over the services."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from kiln.api.dashboard import (
    account_pages,
    audit_pages,
    auth_pages,
    share_pages,
    storage_pages,
    vm_io,
    vm_pages,
)
from kiln.api.dashboard.session import SessionStore
from kiln.api.dashboard.web import HERE
from kiln.config import Settings

__all__ = ["install_dashboard"]

log = logging.getLogger(__name__)
VENDOR_FILES = ("htmx.min.js", "xterm.js", "xterm.css", "addon-fit.js")


def install_dashboard(app: FastAPI, settings: Settings) -> None:
    missing = [name for name in VENDOR_FILES if not (HERE / "static" / "vendor" / name).is_file()]
    if missing:
        # The pages still load; without these the lists do not follow and there is no terminal.
        log.warning("the dashboard's assets are missing (%s): run `make setup` (scripts/assets.sh)", ", ".join(missing))
    app.state.dashboard_sessions = SessionStore()
    app.state.dashboard_settings = settings
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")
    for module in (auth_pages, vm_pages, vm_io, share_pages, account_pages, storage_pages, audit_pages):
        app.include_router(module.router)
