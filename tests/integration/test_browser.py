"""Browser sessions end to end: a real ``kiln serve`` (root, its egress daemon),
VMs of the browser image with Chromium, the SDK's own ``BrowserManager`` and
``BrowserSession`` as the client, pages served by the test's outside world.

The browser image and its warm base snapshot (Chromium running) are built on
first use by the module's fixture: the first run on a host pays the Debian
download (a couple of minutes) and one cold boot with Chromium's first start.
At the end no session, VM or networking of the server may be left.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from egress_helpers import nothing_left_eventually, world_env
from instavm import InstaVM
from instavm.exceptions import (
    BrowserNavigationError,
    BrowserSessionError,
    BrowserTimeoutError,
    ElementNotFoundError,
)
from instavm_cli import Cli
from live_api import Api, live_server
from outside_world import OutsideWorld
from PIL import Image
from unit.harness import add_user

from kiln.browser.guest import BROWSER_VARIANT, WARM_UPS
from kiln.config import Settings
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QemuHypervisor
from kiln.runtime.snapshots import BaseSnapshots, Shape

# The first run on a host builds the image and its warm base snapshot (minutes).
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("quiet_world"), pytest.mark.timeout(1800)]

WIDTH, HEIGHT = 800, 600
RED, BLUE = (255, 0, 0), (0, 128, 255)
FORM = "http://allowed.test/form"
# Generous: a page load takes seconds to tens of seconds under TCG on a busy host.
NAVIGATION_MS = 180_000
ACTION_MS = 180_000
# A page that needs no network (no egress policy is set for the manager's own session).
LOCAL_PAGE = (
    "data:text/html,<title>local</title><input id=q><button id=go type=button "
    "onclick=\"document.body.insertAdjacentHTML('beforeend', '<p id=done>clicked</p>')\">Go</button>"
)


def build_browser_image() -> None:
    """The image and the warm base snapshot of the shape sessions use (cache hits: seconds)."""
    settings = Settings()
    image = ImageStore(settings).build(BROWSER_VARIANT)
    base = BaseSnapshots(settings, QemuHypervisor(settings), warm_ups=WARM_UPS)
    asyncio.run(base.ensure(image, Shape(settings.browser_memory_mb, settings.browser_vcpu_count)))


@pytest.fixture(scope="module")
def api(world: OutsideWorld) -> Iterator[Api]:
    build_browser_image()
    # A restored browser VM's agent answers only once the guest's Chromium let it
    # (tens of seconds on a loaded two-core TCG host): more than the default 60 s boot time.
    with live_server("kiln-browser-", env=world_env(world, KILN_BOOT_TIMEOUT_SECONDS="300")) as served:
        try:
            yield served
        finally:
            lines = served.server.log_tail(5000).splitlines()
            print("\n".join(line for line in lines if line.startswith(("WARNING", "ERROR"))))
        for vm in served.http.get("/v1/vms").json():
            served.delete(vm["vm_id"])
        assert nothing_left_eventually(served.settings) == []


# The SDK's HTTP timeout: a crashed browser's restart is a cold Chromium start (minutes under TCG).
SDK_TIMEOUT_SECONDS = 900


@pytest.fixture(scope="module")
def sdk(api: Api) -> InstaVM:
    return InstaVM(
        api_key=api.server.admin_key, base_url=api.server.url, auto_start_session=False, timeout=SDK_TIMEOUT_SECONDS
    )


@pytest.fixture(scope="module")
def other(api: Api) -> InstaVM:
    key = asyncio.run(add_user(api.settings, "browser-other"))
    return InstaVM(api_key=key, base_url=api.server.url, auto_start_session=False, timeout=SDK_TIMEOUT_SECONDS)


def allow_world(sdk: InstaVM, session_id: str) -> None:
    sdk.set_session_egress(
        session_id, allow_package_managers=False, allow_http=True, allow_https=False, allowed_domains=["allowed.test"]
    )


def decode(screenshot: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(screenshot))).convert("RGB")


def near(pixel: tuple[int, ...], wanted: tuple[int, int, int], slack: int = 12) -> bool:
    return all(abs(got - want) <= slack for got, want in zip(pixel, wanted, strict=False))


def test_a_form_is_filled_clicked_read_and_photographed(api: Api, sdk: InstaVM, world: OutsideWorld) -> None:
    session = sdk.browser.create_session(viewport_width=WIDTH, viewport_height=HEIGHT)
    listed = sdk.list_browser_sessions()
    assert [entry["session_id"] for entry in listed] == [session.session_id]
    assert listed[0]["status"] == "active" and listed[0]["viewport_width"] == WIDTH
    allow_world(sdk, session.session_id)

    page = session.navigate(FORM, wait_timeout=NAVIGATION_MS)
    assert (page["title"], page["url"], page["status"]) == ("Kiln form", FORM, 200), page
    assert world.seen.to("allowed-http"), "the page came from the outside world"
    session.fill("#name", "Ada", timeout=ACTION_MS)
    session.click("#go", timeout=ACTION_MS)
    session.wait_for("visible", "#result", timeout=ACTION_MS)
    content = session.extract_content()
    assert "Hello, Ada!" in content["readable_content"]["content"], content
    assert content["readable_content"]["title"] == "Kiln form"
    assert any(element["selector"] == "#go" for element in content["interactive_elements"]), content
    assert any(anchor["text"] == "Hello, Ada!" for anchor in content["content_anchors"]), content
    (result,) = session.extract_elements("#result", ["id", "text"])
    assert (result["tag"], result["text"], result["attributes"]) == ("p", "Hello, Ada!", {"id": "result"})
    assert session.scroll(y=40)["scroll_y"] >= 0 and session.scroll(selector="#go")["success"]
    session.fill("#name", "", timeout=ACTION_MS)
    session.type("#name", "Bob", delay=10, timeout=ACTION_MS)
    (field,) = session.extract_elements("#name", ["value"])
    assert field["attributes"]["value"] == "Bob"

    shot = decode(session.screenshot(full_page=False))
    assert shot.size == (WIDTH, HEIGHT)
    assert near(shot.getpixel((50, 50)), RED) and near(shot.getpixel((WIDTH - 20, HEIGHT - 20)), BLUE)
    clip = decode(session.screenshot(clip={"x": 0, "y": 0, "width": 100, "height": 100}))
    assert clip.size == (100, 100) and all(near(clip.getpixel((x, y)), RED) for x, y in ((2, 2), (97, 97)))
    jpeg_data = base64.b64decode(session.screenshot(full_page=False, format="jpeg", quality=80))
    jpeg = Image.open(io.BytesIO(jpeg_data))
    assert jpeg.format == "JPEG" and jpeg.size == (WIDTH, HEIGHT)
    assert near(jpeg.convert("RGB").getpixel((50, 50)), RED, slack=24)
    webp = Image.open(io.BytesIO(base64.b64decode(session.screenshot(full_page=False, format="webp"))))
    assert webp.format == "WEBP" and webp.size == (WIDTH, HEIGHT)

    vm_id = listed[0]["vm_id"]
    assert session.close() is True
    assert sdk.list_browser_sessions() == []
    assert api.vm(vm_id)["status"] == "terminated"


def test_the_cli_drives_one_session_command_by_command(api: Api, world: OutsideWorld, tmp_path: Path) -> None:
    """Every ``instavm browser`` command, run as a user runs it, in one session
    (the CLI contract's rows of them point here: a browser session is this module's world)."""
    (tmp_path / "home").mkdir()
    cli = Cli.of(api.server.url, api.server.admin_key, tmp_path / "home")
    created = cli.json("browser", "session", "create", "--width", str(WIDTH), "--height", str(HEIGHT))
    assert isinstance(created, dict)
    sid = created["session_id"]
    try:
        assert f"{sid}  active" in cli.ok("browser", "session", "ls")
        cli.ok("egress", "set", "--session", sid, "--no-allow-package-managers", "--allow-http", "--deny-https",
               "--domain", "allowed.test")  # fmt: skip
        page = cli.ok("browser", "navigate", FORM, "--session", sid, "--wait-timeout", str(NAVIGATION_MS))
        assert "Title: Kiln form" in page, page
        on = ("--session", sid, "--timeout", str(ACTION_MS))
        assert "Filled: #name" in cli.ok("browser", "fill", "#name", "Ad", *on)
        assert "Typed into: #name" in cli.ok("browser", "type", "#name", "a", "--delay", "0", *on)
        assert "Clicked: #go" in cli.ok("browser", "click", "#go", *on)
        assert "Condition met: visible" in cli.ok("browser", "wait", "visible", "--selector", "#result", *on)
        (result,) = cli.json("browser", "extract", "--session", sid, "--selector", "#result")["elements"]  # type: ignore[call-overload]
        assert (result["tag"], result["text"]) == ("p", "Hello, Ada!"), result
        read = cli.json("browser", "read", "--session", sid)
        assert isinstance(read, dict) and "Hello, Ada!" in read["readable_content"]["content"], read
        assert "Scrolled: y=40" in cli.ok("browser", "scroll", "--session", sid, "--y", "40")
        shot = tmp_path / "shot.png"
        cli.ok("browser", "screenshot", "--session", sid, "--out", str(shot), "--no-full-page")
        image = Image.open(shot).convert("RGB")
        assert image.size == (WIDTH, HEIGHT) and near(image.getpixel((50, 50)), RED)
    finally:
        closed = cli.run("browser", "session", "close", sid)
    assert closed.returncode == 0 and f"Closed session {sid}" in closed.stdout, closed
    assert "No active browser sessions." in cli.ok("browser", "session", "ls")


def test_a_denied_host_a_missing_element_and_a_timeout_are_named(sdk: InstaVM, world: OutsideWorld) -> None:
    with sdk.browser.create_session(viewport_width=WIDTH, viewport_height=HEIGHT) as session:
        allow_world(sdk, session.session_id)
        with pytest.raises(BrowserNavigationError, match="egress policy does not allow http to denied.test"):
            session.navigate("http://denied.test/form", wait_timeout=NAVIGATION_MS)
        assert world.seen.to("denied-http") == []
        session.navigate(FORM, wait_timeout=NAVIGATION_MS)
        with pytest.raises(ElementNotFoundError):
            session.click("#no-such-button", timeout=1000)
        with pytest.raises(BrowserTimeoutError):
            session.wait_for("visible", "#result", timeout=1000)  # nobody pressed the button


def test_the_managers_default_session_serves_its_calls_and_goes_with_close(sdk: InstaVM) -> None:
    manager = sdk.browser
    page = manager.navigate(LOCAL_PAGE, wait_timeout=NAVIGATION_MS)
    assert page["title"] == "local", page
    manager.fill("#q", "abc", timeout=ACTION_MS)
    manager.type("#q", "d", delay=0, timeout=ACTION_MS)
    manager.click("#go", timeout=ACTION_MS)
    manager.wait_for("visible", "#done", timeout=ACTION_MS)
    assert manager.extract_elements("#q", attributes=["value"])[0]["attributes"] == {"value": "abcd"}
    assert "clicked" in manager.extract_content()["readable_content"]["content"]
    assert decode(manager.screenshot(full_page=False)).size == (1920, 1080)  # the SDK's default viewport
    session_id = manager._default_session_id
    manager.close()
    with pytest.raises(BrowserSessionError, match="not found"):
        sdk.get_browser_session(session_id)


def test_another_user_sees_nothing_of_a_session(api: Api, sdk: InstaVM, other: InstaVM) -> None:
    with sdk.browser.create_session(viewport_width=WIDTH, viewport_height=HEIGHT) as session:
        assert other.list_browser_sessions() == []
        with pytest.raises(BrowserSessionError, match="not found"):
            other.get_browser_session(session.session_id)
        with pytest.raises(BrowserSessionError, match="not found"):
            other.browser_navigate(FORM, session.session_id)
        other.close_browser_session(session.session_id)  # a 404, which the SDK takes for closed
        assert sdk.get_browser_session(session.session_id)["status"] == "active"


def test_a_crashed_browser_is_restarted_and_the_session_says_so(api: Api, sdk: InstaVM) -> None:
    with sdk.browser.create_session(viewport_width=WIDTH, viewport_height=HEIGHT) as session:
        allow_world(sdk, session.session_id)
        session.navigate(FORM, wait_timeout=NAVIGATION_MS)
        killed = api.http.post(
            "/execute",
            json={
                "session_id": session.session_id,
                "command": "pkill -KILL -f remote-debugging-por[t]",
                "language": "bash",
            },
        )
        assert killed.status_code == 200, killed.text
        # The action that finds the browser dead either restarts it first or
        # answers that it was restarted; the next one works either way.
        try:
            session.navigate(FORM, wait_timeout=NAVIGATION_MS)
        except BrowserNavigationError as error:
            assert "crashed and was restarted" in str(error)
        assert session.navigate(FORM, wait_timeout=NAVIGATION_MS)["title"] == "Kiln form"
        assert sdk.get_browser_session(session.session_id)["browser_restarts"] == 1


def test_bad_requests_are_refused_clearly(api: Api) -> None:
    http: httpx.Client = api.http
    unknown = http.post("/v1/browser/interactions/navigate", json={"session_id": "nope", "url": FORM})
    assert unknown.status_code == 404 and "browser session nope not found" in unknown.json()["detail"]
    no_target = http.post("/v1/browser/interactions/scroll", json={"session_id": "nope"})
    assert no_target.status_code == 422
    assert http.post("/v1/browser/sessions/", json={"viewport_width": 5}).status_code == 422
