"""The dashboard in a real headless Chromium (Debian's, driven by Playwright)
against a real ``kiln serve`` with real VMs.

One server serves the module; its users are made with the store next to it.
Every wait is for a condition on the page (generous timeouts), never a sleep.
Every VM is deleted through the page, and again through the API and from its
run dir at the end, whatever happened. Screenshots of each main page go to the
test's tmp dir (and to docs/screenshots/ with KILN_SAVE_SCREENSHOTS=1).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dashboard_browser import (
    PASSWORD,
    STEP_MS,
    Watched,
    check_another_user_sees_nothing,
    check_the_admin_sees_everyone,
    sign_in_with_password,
)
from dashboard_views import (
    check_a_vm_with_a_volume_and_a_vault,
    check_audit_events,
    check_shares,
    check_the_file_browser,
    check_the_terminal_follows_the_window,
    check_volumes_and_vaults,
)
from live_server import LiveServer, server_settings, serving
from playwright.sync_api import Browser, Page, expect, sync_playwright
from unit.harness import add_user
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

BOOT_MS = 240_000  # a VM booting under TCG on a busy 2-core host
expect.set_options(timeout=STEP_MS)


@dataclass
class Users:
    alice_key: str
    bob_key: str


# The users' API keys, for the server's teardown: it deletes every live VM of theirs.
USER_KEYS: list[str] = []


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving("kiln-dash-", users=lambda: USER_KEYS) as live:
        yield live


@pytest.fixture(scope="module")
def users(server: LiveServer) -> Users:
    settings = server_settings(server.data_dir)
    alice = asyncio.run(add_user(settings, "alice", PASSWORD))
    bob = asyncio.run(add_user(settings, "bob"))
    USER_KEYS[:] = [alice, bob]
    return Users(alice, bob)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (KILN_TEST_CHROMIUM: another build, or in a check of this rule none).
    Asked for before the server, so that a host without one stops here at once."""
    executable = os.environ.get("KILN_TEST_CHROMIUM") or shutil.which("chromium")
    if executable is None or not Path(executable).is_file():
        # Under CI=true this skip is a failure (tests/conftest.py).
        pytest.skip(f"chromium is not installed ({executable or 'not on PATH'}; scripts/test.sh installs Debian's)")
    return executable


@pytest.fixture(scope="module")
def browser(chromium: str, server: LiveServer, users: Users) -> Iterator[Browser]:
    # After the server and its users: Playwright's sync API runs an event loop in this
    # thread, where their asyncio.run (setting up, and tearing down) could not.
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's own sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def vm_id_of(page: Page) -> str:
    found = re.search(r"/ui/vms/(vm-[^/?]+|[^/?]+)$", page.url.split("?")[0])
    assert found, page.url
    return found.group(1)


def test_a_user_runs_vms_from_the_browser(
    chromium: str, server: LiveServer, users: Users, browser: Browser, tmp_path: Path
) -> None:
    watched = Watched(browser, server.url, tmp_path)
    page = watched.page
    try:
        page.goto("/ui/login")
        watched.screenshot("login")
        sign_in_with_password(watched, "alice")

        # Bad input: a page saying what is wrong, with a 4xx.
        page.get_by_label("Metadata (KEY=VALUE lines or JSON)").fill("{not json")
        with page.expect_response(lambda answer: answer.url.endswith("/ui/vms")) as refused:
            page.get_by_role("button", name="Create VM").click()
        assert refused.value.status == 422
        expect(page.get_by_role("alert")).to_have_text("metadata: not valid JSON")
        watched.errors = [e for e in watched.errors if "422" not in e]  # the browser logs the 422 itself
        page.goto("/ui/")

        # Create a VM, then watch the list turn it running without a reload.
        page.get_by_label("Shape").select_option("256x1")
        page.get_by_label("Metadata (KEY=VALUE lines or JSON)").fill("purpose=dashboard-test")
        # The network fields of POST /v1/vms: a policy of its own, a public share.
        page.get_by_label("Outbound traffic").select_option("policy")
        page.get_by_label("Any HTTPS").check()
        page.get_by_label("Allowed domains (space or comma separated)").fill("pypi.org")
        page.get_by_label("Share a port").fill("8080")
        page.get_by_label("Public (no sign-in to reach it)").check()
        page.get_by_role("button", name="Create VM").click()
        vm_id = vm_id_of(page)
        page.goto("/ui/")
        page.evaluate("window.kilnNotReloaded = true")
        row = page.locator(f'tr[data-vm-id="{vm_id}"]')
        expect(row).to_contain_text("purpose=dashboard-test")
        expect(row.locator(".status")).to_have_text("running", timeout=BOOT_MS)
        assert page.evaluate("window.kilnNotReloaded === true"), "the list reloaded the page"
        watched.screenshot("vms")

        # Its page: a terminal over the PTY WebSocket.
        row.get_by_role("link", name=vm_id).click()
        expect(page.locator("#vm-status")).to_have_text("running")
        expect(page.locator("#vm-usage")).to_contain_text("CPU s")
        page.get_by_role("button", name="Open a terminal").click()
        expect(page.locator("#terminal-status")).to_have_text("Connected.")
        page.locator("#terminal").click()
        page.keyboard.type("echo hello\n")
        # The output line itself (the typed line holds "echo hello", not "hello" alone).
        expect(page.locator(".xterm-rows > div").filter(has_text=re.compile(r"^\s*hello\s*$"))).to_have_count(
            1, timeout=STEP_MS
        )
        watched.screenshot("vm")
        check_the_terminal_follows_the_window(page)
        check_the_terminal_socket_wants_this_dashboards_session(server, page, vm_id)
        check_shares(page, vm_id, watched.screenshot)

        # Upload a file and download it back.
        sent = tmp_path / "greeting.txt"
        sent.write_bytes(b"hello from the browser\n" * 100)
        page.locator("#upload-file").set_input_files(str(sent))
        page.locator("#upload-path").fill("/tmp/greeting.txt")
        page.get_by_role("button", name="Upload").click()
        expect(page.get_by_role("status").filter(has_text="Uploaded /tmp/greeting.txt")).to_be_visible()
        page.locator("#download-path").fill("/tmp/greeting.txt")
        with page.expect_download() as download_info:
            page.get_by_role("button", name="Download").click()
        download = download_info.value
        assert download.suggested_filename == "greeting.txt"
        assert Path(download.path()).read_bytes() == sent.read_bytes()
        expect(page.locator("#console")).not_to_have_text("")
        check_the_file_browser(page, sent, "/tmp", watched.errors)
        watched.screenshot("vm-files")
        egress = httpx.get(f"{server.url}/v1/egress/vm/{vm_id}", headers={"X-API-Key": users.alice_key}, timeout=30)
        assert egress.json()["allowed_domains"] == ["pypi.org"] and egress.json()["allow_https"] is True

        # A snapshot, and a VM from it.
        page.get_by_label("Snapshot name").fill("dash-snap")
        page.get_by_role("button", name="Snapshot", exact=True).click()
        expect(page).to_have_url(re.compile(r"/ui/snapshots$"))
        snap_row = page.locator("tr", has_text="dash-snap")
        expect(snap_row.locator(".status")).to_have_text("ready", timeout=BOOT_MS)
        watched.screenshot("snapshots")
        snapshot_id = snap_row.get_attribute("data-snapshot-id")
        assert snapshot_id
        snap_row.get_by_role("button", name="Create a VM from dash-snap").click()
        restored_id = vm_id_of(page)
        assert restored_id != vm_id
        expect(page.locator("#vm-status")).to_have_text("running", timeout=BOOT_MS)
        expect(page.locator("#vm-record")).to_contain_text(snapshot_id)
        page.get_by_role("button", name="Suspend").click()
        expect(page.locator("#vm-status")).to_have_text("suspended", timeout=BOOT_MS)
        page.get_by_role("button", name="Resume").click()
        expect(page.locator("#vm-status")).to_have_text("running", timeout=BOOT_MS)
        page.get_by_role("button", name="Clone").click()
        clone_id = vm_id_of(page)
        assert clone_id not in (vm_id, restored_id)
        expect(page.locator("#vm-status")).to_have_text("running", timeout=BOOT_MS)
        page.get_by_role("button", name="Delete").click()
        expect(page).to_have_url(re.compile(r"/ui/$"))
        expect(page.locator(f'tr[data-vm-id="{clone_id}"]')).to_have_count(0)
        page.goto(f"/ui/vms/{restored_id}")

        # The second user sees none of it, even by its URLs; the admin sees it all.
        check_another_user_sees_nothing(browser, server, users.bob_key, tmp_path, [vm_id, restored_id, snapshot_id])
        check_the_admin_sees_everyone(browser, server, tmp_path, [vm_id, restored_id])

        # Delete both VMs, then the snapshot.
        page.get_by_role("button", name="Delete").click()
        expect(page).to_have_url(re.compile(r"/ui/$"))
        page.goto(f"/ui/vms/{vm_id}")
        page.get_by_role("button", name="Delete").click()
        expect(page).to_have_url(re.compile(r"/ui/$"))
        expect(page.locator("#vm-rows")).to_contain_text("No live VMs.", timeout=STEP_MS)
        # The clone's snapshot builds on dash-snap: while it exists, dash-snap is a 409 page.
        page.goto("/ui/snapshots")
        clone_snapshot = page.locator("tr", has_text=restored_id).filter(has_not_text="dash-snap")
        expect(clone_snapshot).to_have_count(1)
        with page.expect_response(lambda answer: answer.url.endswith("/delete")) as refused:
            page.get_by_role("button", name="Delete dash-snap").click()
        assert refused.value.status == 409
        expect(page.get_by_role("alert")).to_be_visible()
        watched.errors = [e for e in watched.errors if "409" not in e]  # the browser logs the 409 itself
        page.goto("/ui/snapshots")
        clone_snapshot.locator(".delete-snapshot").click()
        expect(page).to_have_url(re.compile(r"/ui/snapshots$"))
        expect(clone_snapshot).to_have_count(0)
        page.get_by_role("button", name="Delete dash-snap").click()
        expect(page).to_have_url(re.compile(r"/ui/snapshots$"))
        expect(page.locator("tr", has_text="dash-snap")).to_have_count(0)

        # API keys: made (shown once), then revoked; the host's capacity.
        page.get_by_role("link", name="API keys").click()
        page.get_by_label("Name").fill("dash-key")
        page.get_by_role("button", name="Create key").click()
        new_key = page.locator("#new-key").inner_text()
        assert new_key.startswith("kiln_")
        assert httpx.get(f"{server.url}/v1/vms", headers={"X-API-Key": new_key}, timeout=30).status_code == 200
        watched.screenshot("keys")
        page.get_by_role("button", name="Revoke dash-key").click()
        expect(page.locator("tr", has_text="dash-key")).to_have_count(0)
        assert new_key not in page.content()
        check_volumes_and_vaults(page, "dash-secret-value-never-shown", watched.screenshot)
        check_a_vm_with_a_volume_and_a_vault(page, BOOT_MS, watched.screenshot)
        check_audit_events(page, vm_id, watched.screenshot)
        page.get_by_role("link", name="Host").click()
        expect(page.locator("#disk")).to_contain_text("GiB free")
        watched.screenshot("host")

        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(re.compile(r"/ui/login$"))
        assert watched.errors == [], watched.errors
    except BaseException:
        # What the page showed when it failed, beside the screenshots, for the log's reader.
        watched.screenshot("failure", for_docs=False)
        (tmp_path / "failure.html").write_text(page.content())
        print(f"the page at the failure: {tmp_path / 'failure.png'}; console: {watched.errors}")
        raise
    finally:
        watched.close()


def check_the_terminal_socket_wants_this_dashboards_session(server: LiveServer, page: Page, vm_id: str) -> None:
    """The terminal's WebSocket, opened by another client: refused without the
    session cookie, and with it from another site's page (its Origin)."""
    pty_id = page.evaluate(
        """async (vmId) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const answer = await fetch(`/ui/vms/${vmId}/terminals`, {method: "POST",
                headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: "{}"});
            return (await answer.json()).pty_id;
        }""",
        vm_id,
    )
    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "kiln_session")
    url = server.url.replace("http://", "ws://") + f"/ui/vms/{vm_id}/terminals/{pty_id}/ws"

    # The sync client: Playwright's sync API already runs an event loop in this thread.
    def close_code(headers: dict[str, str]) -> int | None:
        with connect(url, additional_headers=headers, open_timeout=30) as socket:
            with pytest.raises(ConnectionClosed):
                socket.recv(timeout=30)
            return socket.close_code

    assert close_code({"Origin": server.url}) == 4401
    assert close_code({"Origin": "http://evil.example", "Cookie": f"kiln_session={cookie}"}) == 4401
