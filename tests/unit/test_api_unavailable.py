"""Routes of features Kiln lacks answer a named 403, never a bare 404; routes that
exist, and routes added after the table, are untouched (fake runtime)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import APIRouter
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from unit.fakes import FakeHypervisor, FakeImageStore
from unit.harness import AppRunner, key_headers

from kiln.api.app import create_app
from kiln.api.unavailable import UNBUILT, Unbuilt, feature_of
from kiln.config import Settings


@pytest.mark.parametrize(
    ("method", "path", "feature"),
    [
        ("PATCH", "/v1/computeruse/sess-1/api/whatever/deep", "computer use"),
        ("GET", "/v1/recordings/rec-1/download", "recordings"),
        ("GET", "/v1/templates", "templates"),
        ("POST", "/v1/templates/slug/runs", "templates"),
        ("POST", "/v1/sessions/sess-1/tape/start", "tapes"),
        ("GET", "/v1/tapes/t-1/events", "tapes"),
        ("GET", "/v1/credits/usage/forecasting", "credits"),
        ("POST", "/api/cli-auth/start", "browser login"),
    ],
)
async def test_an_unbuilt_feature_is_refused_by_name(
    run_app: AppRunner, admin_key: Callable[[], str], method: str, path: str, feature: str
) -> None:
    async with run_app() as client:
        answer = await client.request(method, path, headers=key_headers(admin_key()))
        assert answer.status_code == 403
        detail = answer.json()["detail"]
        assert feature in detail and "not available on this server" in detail


async def test_served_routes_and_plain_unknown_paths_are_untouched(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        assert (await client.get("/v1/users/me", headers=auth)).status_code == 200
        # A session's own routes live beside the tape prefix.
        assert (await client.get("/v1/sessions/status/nope", headers=auth)).status_code == 404
        assert (await client.get("/v1/no-such-thing", headers=auth)).json() == {"detail": "Not Found"}
        # A path that only starts like a refused one is not refused.
        assert (await client.get("/v1/templatesx", headers=auth)).json() == {"detail": "Not Found"}


def test_a_route_added_later_wins_over_its_refusal(
    settings: Settings, hypervisor: FakeHypervisor, images: FakeImageStore
) -> None:
    app = create_app(settings, hypervisor, images)
    later = APIRouter()

    @later.get("/v1/templates")
    async def templates() -> dict[str, list[str]]:
        return {"templates": []}

    app.include_router(later)
    with TestClient(app) as client:
        assert client.get("/v1/templates").json() == {"templates": []}
        assert client.get("/v1/templates/x").status_code == 403


def test_a_websocket_of_an_unbuilt_feature_closes_with_its_name(
    settings: Settings, hypervisor: FakeHypervisor, images: FakeImageStore
) -> None:
    with TestClient(create_app(settings, hypervisor, images)) as client:
        with pytest.raises(WebSocketDisconnect) as closed:
            with client.websocket_connect("/v1/computeruse/s-1/vnc/websockify"):
                pass
    assert closed.value.code == 4403 and "computer use" in closed.value.reason


def test_prefixes_match_whole_segments_and_stars_one_segment() -> None:
    row = Unbuilt("/v1/vms/*/volumes", "volumes")
    assert row.matches("/v1/vms/vm-1/volumes") and row.matches("/v1/vms/vm-1/volumes/vol-2")
    assert not row.matches("/v1/vms/vm-1") and not row.matches("/v1/vms/vm-1/volumesx")
    assert feature_of("/v1/vms/vm-1") is None
    # Every row names its feature for the detail.
    assert all(row.feature and row.prefix.startswith("/") for row in UNBUILT)
