"""Chromium in the guest: how it is started, and where its DevTools listen.

The ``browser`` image (``images/browser.toml``) carries Debian's ``chromium``.
It is started by the agent (``exec`` of a detached ``setsid``), headless,
DevTools on the guest's loopback only, a throwaway profile in ``/tmp``. The
start is idempotent: a browser already listening is left alone, so a VM
restored from a snapshot with Chromium running keeps it.
"""

from __future__ import annotations

import base64
import shlex

from kiln.runtime.driver import AgentChannel, Machine
from kiln.runtime.errors import AgentError, AgentTimeout, AgentUnavailable, RuntimeFailure
from kiln.runtime.snapshots import WarmUp

DEVTOOLS_PORT = 9222
PROFILE_DIR = "/tmp/kiln-browser"
LOG_FILE = "/tmp/kiln-browser.log"
# Headless, loopback DevTools, nothing that calls home or needs a GPU. Root in
# a VM of one user: Chromium's own sandbox adds nothing the VM does not give.
CHROMIUM_FLAGS = (
    "--headless",
    f"--remote-debugging-port={DEVTOOLS_PORT}",
    "--remote-debugging-address=127.0.0.1",
    f"--user-data-dir={PROFILE_DIR}",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    # Fewer processes: each one costs seconds to start under TCG.
    "--no-zygote",
    "--in-process-gpu",
    "--enable-features=NetworkServiceInProcess2",
    # One renderer for every page: the one started with the first page is reused.
    "--renderer-process-limit=1",
    "--disable-site-isolation-trials",
    "--disable-features=Translate,MediaRouter,OptimizationHints,DialMediaRouteProvider",
    "about:blank",
)
LAUNCH_SECONDS = 30.0
# Chromium's first start under TCG takes a minute or more.
WARM_UP_SECONDS = 300.0


def launch_script() -> str:
    """Wake a Chromium stopped by ``warm_up``; start one unless its DevTools port is
    taken already (``ss`` is iproute2's)."""
    command = " ".join(shlex.quote(part) for part in ("chromium", *CHROMIUM_FLAGS))
    return (
        "pkill -CONT -x chromium; "
        f"ss -Hltn 'sport = :{DEVTOOLS_PORT}' | grep -q . && exit 0; "
        f"rm -rf {PROFILE_DIR}; setsid -f {command} >{LOG_FILE} 2>&1 </dev/null"
    )


async def launch(agent: AgentChannel) -> None:
    """Ask the guest to start Chromium (returns once it is launched, not ready)."""
    result = await agent.call("exec", argv=["/bin/sh", "-c", launch_script()], timeout=LAUNCH_SECONDS)
    if result.get("exit_code") != 0:
        raise RuntimeError(f"starting chromium in the guest failed (exit {result.get('exit_code')})")


async def warm_up(machine: Machine) -> None:
    """Before a browser image's base snapshot is saved: Chromium started and
    listening, so every VM restored from it has a browser ready."""
    await launch(machine.agent)
    wait = (
        f"while ! ss -Hltn 'sport = :{DEVTOOLS_PORT}' | grep -q .; do sleep 0.5; done; "
        # Until DevTools answers (the first page is up), then let the start-up settle.
        f"until curl -fsS -m 30 -o /dev/null http://127.0.0.1:{DEVTOOLS_PORT}/json/version; do sleep 1; done; "
        "sleep 5; "
        # Saved stopped: a restored VM's agent answers at once (a running Chromium
        # catching up with the jump of its clock starves it under TCG), and the
        # session's first connection wakes it (launch_script).
        "pkill -STOP -x chromium"
    )
    result = await machine.agent.call("exec", argv=["/bin/sh", "-c", wait], timeout=WARM_UP_SECONDS)
    if result.get("exit_code") != 0:
        tail = await log_tail(machine.agent)
        raise RuntimeFailure(f"chromium did not listen within {WARM_UP_SECONDS:g}s: {tail}")


# The variants whose base snapshots are warmed up (kiln.runtime.snapshots.BaseSnapshots).
BROWSER_VARIANT = "browser"
WARM_UPS = {BROWSER_VARIANT: WarmUp("chromium-stopped", warm_up)}


async def log_tail(agent: AgentChannel, max_bytes: int = 2000) -> str:
    """The end of Chromium's own log in the guest, for a failure's message."""
    try:
        result = await agent.call("read_file", path=LOG_FILE, offset=0, length=64 * 1024)
    except (AgentError, AgentTimeout, AgentUnavailable):
        return ""  # a message helper: no log is an empty tail
    return base64.b64decode(result.get("data") or "").decode("utf-8", "replace")[-max_bytes:]
