"""Steps of the dashboard's browser test on the pages beyond the VM's life cycle:
the terminal following the window, the file browser, shares, volumes, vaults,
audit events. Each takes the signed-in page (and a screenshot taker); every wait
is for a condition on the page, never a sleep."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect

Shoot = Callable[[str], None]
STTY_SIZE = re.compile(r"^\s*(\d+) (\d+)\s*$")


def terminal_size(page: Page, before: set[str]) -> tuple[int, int]:
    """Run ``stty size`` in the open terminal: the PTY's rows and columns, as the guest sees them."""
    page.locator("#terminal").click()
    page.keyboard.type("stty size\n")
    answers = page.locator(".xterm-rows > div").filter(has_text=STTY_SIZE)
    expect(answers).to_have_count(len(before) + 1)
    found = [text for text in answers.all_inner_texts() if text not in before]
    assert found, answers.all_inner_texts()
    before.add(found[0])
    rows, cols = STTY_SIZE.match(found[0]).groups()  # type: ignore[union-attr]
    return int(rows), int(cols)


def check_the_terminal_follows_the_window(page: Page) -> None:
    """The terminal fits its box, and a narrower window is a narrower PTY (the resize frame)."""
    seen: set[str] = set()
    rows, wide = terminal_size(page, seen)
    assert wide > 100, wide  # fitted to a laptop-wide box, not the 100 columns it was opened with
    screen_width = page.evaluate("document.querySelector('.xterm-screen').style.width")
    size = page.viewport_size
    assert size is not None
    page.set_viewport_size({"width": 900, "height": size["height"]})
    page.wait_for_function("(w) => document.querySelector('.xterm-screen').style.width !== w", arg=screen_width)
    narrow_rows, narrow = terminal_size(page, seen)
    assert narrow < wide and narrow_rows == rows, (wide, narrow)
    page.set_viewport_size(size)


def check_the_file_browser(page: Page, sent: Path, directory: str, errors: list[str]) -> None:
    """A missing directory is said so in place; then list ``/``, open ``directory``,
    see the uploaded file, download it from the list, go back up."""
    page.get_by_label("Directory", exact=True).fill("/no/such/dir")
    with page.expect_response(lambda answer: "/dir?" in answer.url) as refused:
        page.get_by_role("button", name="List").click()
    assert refused.value.status == 404
    expect(page.locator("#dir-listing").get_by_role("alert")).to_contain_text("/no/such/dir")
    errors[:] = [e for e in errors if "404" not in e]  # the browser logs the 404 itself
    page.get_by_label("Directory", exact=True).fill("/")
    page.get_by_role("button", name="List").click()
    listing = page.locator("#dir-table")
    expect(listing).to_have_attribute("data-path", "/")
    listing.get_by_role("link", name=f"{directory.strip('/')}/", exact=True).click()
    expect(listing).to_have_attribute("data-path", directory)
    with page.expect_download() as download_info:
        listing.get_by_role("link", name=f"Download {sent.name}").click()
    assert Path(download_info.value.path()).read_bytes() == sent.read_bytes()
    listing.get_by_role("link", name="Up to /").click()
    expect(listing).to_have_attribute("data-path", "/")


def check_shares(page: Page, vm_id: str, shoot: Shoot) -> None:
    """The share the create form asked for, one more made here, then revoked."""
    shares = page.locator("#shares")
    made_with_the_vm = shares.locator("tr", has_text="8080")
    expect(made_with_the_vm).to_contain_text("public")
    expect(made_with_the_vm.get_by_role("link")).to_have_attribute("href", re.compile(r"^http://shr"))
    page.get_by_label("Port", exact=True).fill("3000")
    page.get_by_role("button", name="Share the port").click()
    expect(page).to_have_url(re.compile(rf"/ui/vms/{vm_id}"))
    made_here = shares.locator("tr", has_text="3000")
    expect(made_here).to_contain_text("private")
    shoot("vm-shares")
    made_here.get_by_role("button", name="Revoke the share of port 3000").click()
    expect(made_here).to_contain_text("revoked")


def check_volumes_and_vaults(page: Page, secret: str, shoot: Shoot) -> None:
    page.get_by_role("link", name="Volumes").click()
    page.get_by_label("Name").fill("dash-vol")
    page.get_by_label("Size (MiB)").fill("32")
    page.get_by_role("button", name="Create volume").click()
    expect(page.locator("#volumes tr", has_text="dash-vol")).to_contain_text("32.0 MiB")
    shoot("volumes")

    page.get_by_role("link", name="Vaults").click()
    page.get_by_label("Name", exact=True).fill("dash-vault")
    page.get_by_role("button", name="Create vault").click()
    vault = page.locator("section", has_text="dash-vault")
    vault.get_by_label("Credential name").fill("DASH_TOKEN")
    vault.get_by_label("Value (sealed; never shown again)").fill(secret)
    vault.get_by_role("button", name="Add the credential to dash-vault").click()
    expect(vault.locator("tr", has_text="DASH_TOKEN")).to_be_visible()
    vault.get_by_label("Service host").fill("api.dash.test")
    vault.get_by_label("Credential sent as a bearer token").fill("DASH_TOKEN")
    vault.get_by_role("button", name="Add the service to dash-vault").click()
    expect(vault.locator("tr", has_text="api.dash.test")).to_be_visible()
    assert secret not in page.content()
    shoot("vaults")


def check_audit_events(page: Page, vm_id: str, shoot: Shoot) -> None:
    page.get_by_role("link", name="Audit").click()
    expect(page.locator("#events tr", has_text="vm.created").filter(has_text=vm_id).first).to_be_visible()
    page.get_by_label("Group").select_option("share")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"event_group=share"))
    expect(page.locator("#events tr", has_text="share.revoked")).to_have_count(1)
    shoot("audit")


def check_a_vm_with_a_volume_and_a_vault(page: Page, boot_ms: int, shoot: Shoot) -> None:
    """The create form's volume and vault fields: the VM runs with both, the
    volume mounted where asked (its file system's lost+found listed there)."""
    page.get_by_role("link", name="Volumes").click()
    volume_id = page.locator("#volumes tr", has_text="dash-vol").get_attribute("data-volume-id")
    page.get_by_role("link", name="VMs").click()
    page.get_by_label("Shape").select_option("256x1")
    page.get_by_label("Volumes (VOLUME_ID:/mount/path lines, :ro for read-only)").fill(f"{volume_id}:/data")
    page.get_by_label("dash-vault").check()
    page.get_by_role("button", name="Create VM").click()
    expect(page.locator("#vm-status")).to_have_text("running", timeout=boot_ms)
    expect(page.locator("#vm-volumes")).to_contain_text(f"{volume_id} at /data (rw")
    expect(page.locator("#vm-vaults")).to_contain_text("vault_")
    page.get_by_label("Directory", exact=True).fill("/data")
    page.get_by_role("button", name="List").click()
    expect(page.locator("#dir-table")).to_have_attribute("data-path", "/data")
    expect(page.locator("#dir-table").get_by_role("link", name="lost+found/")).to_be_visible()
    shoot("vm-volume")
    page.get_by_role("button", name="Delete").click()
    expect(page).to_have_url(re.compile(r"/ui/$"))
    expect(page.locator("#vm-rows")).to_contain_text("No live VMs.")
