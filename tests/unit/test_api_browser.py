"""The browser routes' answers that need no browser (fake runtime): an unbuilt
image, unknown sessions, requests that say nothing to do."""

from __future__ import annotations

from collections.abc import Callable

from unit.fakes import FakeImageStore
from unit.harness import AppRunner, key_headers

from kiln.config import Settings


async def test_without_the_browser_image_a_session_is_refused_by_name(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        answer = await client.post("/v1/browser/sessions/", json={"viewport_width": 800}, headers=auth)
        assert answer.status_code == 503 and "kiln images build browser" in answer.json()["detail"]
        assert (await client.get("/v1/browser/sessions/", headers=auth)).json() == {"sessions": [], "count": 0}


async def test_unknown_sessions_and_empty_requests(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        assert (await client.get("/v1/browser/sessions/nope", headers=auth)).status_code == 404
        assert (await client.delete("/v1/browser/sessions/nope", headers=auth)).status_code == 404
        navigate = await client.post(
            "/v1/browser/interactions/navigate", json={"session_id": "nope", "url": "about:blank"}, headers=auth
        )
        assert navigate.status_code == 404 and navigate.json()["detail"] == "browser session nope not found"
        scroll = await client.post("/v1/browser/interactions/scroll", json={"session_id": "s"}, headers=auth)
        assert scroll.status_code == 422
        wait = await client.post(
            "/v1/browser/interactions/wait", json={"session_id": "s", "condition": "visible"}, headers=auth
        )
        assert wait.status_code == 422
        assert (await client.get("/v1/browser/sessions/")).status_code == 401


async def test_a_session_past_the_users_quota_is_429_naming_it_and_starts_nothing(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings, images: FakeImageStore
) -> None:
    """A browser session is a VM: the user's VM quota holds for it (the SDK
    turns the 429 into its QuotaExceededError)."""
    images.built.add("browser")
    settings.quota_vms = 1
    async with run_app() as client:
        auth = key_headers(admin_key())
        assert (await client.post("/v1/vms", json={}, headers=auth)).status_code == 200
        answer = await client.post("/v1/browser/sessions/", json={"viewport_width": 800}, headers=auth)
        assert answer.status_code == 429
        assert "quota vms" in answer.json()["detail"] and "KILN_QUOTA_VMS" in answer.json()["detail"]
        assert len((await client.get("/v1/vms", headers=auth)).json()) == 1
        assert (await client.get("/v1/browser/sessions/", headers=auth)).json() == {"sessions": [], "count": 0}
