"""The web dashboard at ``/`` (``/ui/...``): server-rendered pages over the services."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from kiln.api.dashboard import account_pages, auth_pages, storage_pages, vm_io, vm_pages
from kiln.api.dashboard.session import SessionStore
from kiln.api.dashboard.web import HERE
from kiln.config import Settings

__all__ = ["install_dashboard"]


def install_dashboard(app: FastAPI, settings: Settings) -> None:
    app.state.dashboard_sessions = SessionStore()
    app.state.dashboard_settings = settings
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")
    for module in (auth_pages, vm_pages, vm_io, account_pages, storage_pages):
        app.include_router(module.router)
