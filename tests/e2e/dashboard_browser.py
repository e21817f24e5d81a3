"""The browser side of the dashboard's test: a watched page (console errors
collected, screenshots saved), signing in, and what each other user sees."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from live_server import LiveServer
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

PASSWORD = "a dashboard password"
STEP_MS = 60_000
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


class Watched:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser: Browser, base_url: str, shots: Path) -> None:
        viewport = {"width": 1366, "height": 900}  # a laptop screen
        self.context = browser.new_context(base_url=base_url, accept_downloads=True, viewport=viewport)
        self.page = self.context.new_page()
        self.page.set_default_timeout(STEP_MS)
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.shots = shots

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location})")

    def screenshot(self, name: str, for_docs: bool = True) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if for_docs and os.environ.get("KILN_SAVE_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, SCREENSHOTS / path.name)

    def close(self) -> None:
        self.context.close()


def sign_in_with_password(watched: Watched, username: str) -> None:
    page = watched.page
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="VMs")).to_be_visible()


def sign_in_with_key(watched: Watched, key: str) -> None:
    page = watched.page
    page.goto("/ui/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="VMs")).to_be_visible()


def check_another_user_sees_nothing(
    browser: Browser, server: LiveServer, bob_key: str, tmp_path: Path, ids: list[str]
) -> None:
    watched = Watched(browser, server.url, tmp_path)
    page = watched.page
    try:
        sign_in_with_key(watched, bob_key)
        expect(page.locator("#vm-rows")).to_contain_text("No live VMs.")
        expect(page.locator("#user-filter")).to_have_count(0)
        shown = page.content()
        page.goto("/ui/snapshots")
        shown += page.content()
        page.goto("/ui/keys")
        shown += page.content()
        assert "dash-snap" not in shown
        for resource in ids:
            assert resource not in shown, resource
        # Its URL is a 404 page for anyone else (the browser logs the 404 itself).
        answer = page.goto(f"/ui/vms/{ids[0]}")
        assert answer is not None and answer.status == 404
        expect(page.locator("#error-message")).to_contain_text("not found")
        assert bob_key_not_in(page, bob_key)
    finally:
        watched.close()


def check_the_admin_sees_everyone(browser: Browser, server: LiveServer, tmp_path: Path, alice_vms: list[str]) -> None:
    """The admin's VM list holds alice's VMs (owner shown); filtered to bob, none of
    them; alice's snapshot and events are in the admin's lists too."""
    watched = Watched(browser, server.url, tmp_path)
    page = watched.page
    try:
        sign_in_with_key(watched, server.admin_key)
        for vm in alice_vms:
            expect(page.locator(f'tr[data-vm-id="{vm}"] .owner')).to_have_text("alice")
        watched.screenshot("admin-vms")
        page.get_by_label("User", exact=True).select_option("bob")
        page.get_by_role("button", name="Show").click()
        expect(page).to_have_url(re.compile(r"/ui/\?user=\d+$"))
        expect(page.locator("#vm-rows")).to_contain_text("No live VMs.")
        page.get_by_role("link", name="Snapshots").click()
        alices = page.locator("#snapshot-rows tr", has_text="dash-snap")
        expect(alices.locator(".owner")).to_have_text("alice")
        expect(alices.get_by_role("button")).to_have_count(0)  # listed; its actions are alice's
        watched.screenshot("admin-snapshots")
        page.get_by_role("link", name="Audit").click()
        expect(page.locator("#events")).to_contain_text("alice")  # everyone's events, by user
        assert watched.errors == [], watched.errors
    finally:
        watched.close()


def bob_key_not_in(page: Page, key: str) -> bool:
    return key not in page.content() and key not in page.url
