"""Browser sessions: a VM of the ``browser`` image per session, its Chromium
driven through ``kiln.browser``.

A browser session *is* a VM (``VmService.create`` with the browser variant:
the same policy, admission and per-user quotas, 429 past them, and a
lifetime): its id is the VM's session id, so the session routes, egress
(``set_session_egress``) and ``/v1/vms`` see it as the user's VM it is. The
viewport and user agent it was made with are kept in the VM's metadata.
Another user's session, or a session id that is no browser's, is 404.

What lives in this process only: one ``BrowserTab`` per running session (the
DevTools tunnel and the Playwright connection), made on first use (again
after a server restart: the page's state is the browser's, not Kiln's), and
how often each session's browser was restarted. A browser that died (crash,
killed) is started again in the same VM on the next action; the action that
found it dead answers 503 saying so, and the session's record counts it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kiln.browser.driver import BrowserTab, PlaywrightHost, Viewport
from kiln.browser.errors import BadSelector, BrowserError, BrowserGone, ElementMissing, NavigationFailed, WaitExpired
from kiln.browser.guest import BROWSER_VARIANT
from kiln.config import Settings
from kiln.net.policy import domain_allowed
from kiln.node.participant import EgressRules
from kiln.runtime.driver import Machine
from kiln.runtime.errors import AgentError, AgentTimeout, AgentUnavailable
from kiln.schemas.vms import VMCreateRequest
from kiln.services.errors import (
    FieldProblem,
    GuestRefused,
    GuestUnavailable,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    PolicyRefused,
    UpstreamFailed,
    WaitTimedOut,
)
from kiln.services.states import LIVE_STATUSES
from kiln.services.vms import VmService
from kiln.store.models import Vm

log = logging.getLogger(__name__)

T = TypeVar("T")
VIEWPORT_KEY = "browser_viewport"
USER_AGENT_KEY = "browser_user_agent"
# Pages that need no network: always allowed.
LOCAL_SCHEMES = frozenset({"about", "data"})
WEB_SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class _Live:
    machine: Machine  # the VM's process the tab was opened in (a resumed VM has a new one)
    tab: BrowserTab


def navigation_refusal(url: str, rules: EgressRules) -> str | None:
    """Why the VM's egress policy does not let its browser load ``url``; None if it does."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in LOCAL_SCHEMES:
        return None
    host = (parts.hostname or "").lower()
    if scheme not in WEB_SCHEMES or not host:
        return f"only http(s), about: and data: URLs can be opened, not {url!r}"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        allowed_scheme = rules.allow_http if scheme == "http" else rules.allow_https
        if domain_allowed(host, rules.web_domains) or (allowed_scheme and domain_allowed(host, rules.allowed_domains)):
            return None
        return (
            f"the session's egress policy does not allow {scheme} to {host} "
            f"(allowed_domains {list(rules.allowed_domains)}, allow_{scheme} {allowed_scheme}); "
            "change it with set_session_egress"
        )
    if any(address in ipaddress.ip_network(cidr, strict=False) for cidr in rules.allowed_cidrs):
        return None
    return (
        f"the session's egress policy does not allow the address {host} "
        f"(allowed_cidrs {list(rules.allowed_cidrs)}); change it with set_session_egress"
    )


class BrowserService:
    def __init__(self, vms: VmService, settings: Settings) -> None:
        self._vms = vms
        self._settings = settings
        self._host = PlaywrightHost()
        self._live: dict[str, _Live] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.restarts: dict[str, int] = {}

    async def stop(self) -> None:
        for vm_id in list(self._live):
            await self._drop(vm_id)
        await self._host.stop()

    # -- sessions ------------------------------------------------------------

    async def create(self, owner_id: int, width: int, height: int, user_agent: str | None) -> Vm:
        """A new VM with its browser connected and a blank page open."""
        if BROWSER_VARIANT not in self._vms.image_variants():
            raise ImageNotBuilt(
                f"browser sessions need the {BROWSER_VARIANT} image: kiln images build {BROWSER_VARIANT}"
            )
        metadata: dict[str, Any] = {VIEWPORT_KEY: f"{width}x{height}"}
        if user_agent:
            metadata[USER_AGENT_KEY] = user_agent
        request = VMCreateRequest(
            image_variant=BROWSER_VARIANT,
            memory_mb=self._settings.browser_memory_mb,
            vcpu_count=self._settings.browser_vcpu_count,
            vm_lifetime_seconds=self._settings.browser_lifetime_seconds,
            metadata=metadata,
        )
        vm = await self._vms.create(owner_id, request, wait=True)
        try:
            await self.act(owner_id, vm.session_id, lambda tab: asyncio.sleep(0))
        except BaseException:
            await self._vms.terminate(owner_id, vm.id)
            raise
        return vm

    async def list(self, owner_id: int) -> list[Vm]:
        await self._forget_ended()
        vms = await self._vms.list(owner_id, live_only=True)
        return [vm for vm in vms if vm.image_variant == BROWSER_VARIANT]

    async def get(self, owner_id: int, session_id: str) -> Vm:
        try:
            vm = await self._vms.session_vm(owner_id, session_id)
        except NotFound:
            vm = None
        if vm is None or vm.image_variant != BROWSER_VARIANT:
            raise NotFound(f"browser session {session_id} not found")
        if vm.status not in LIVE_STATUSES:
            # The SDK reads a 404 as "not found or expired": a closed session is gone.
            raise NotFound(f"browser session {session_id} not found: it has ended ({vm.status})")
        return vm

    async def close(self, owner_id: int, session_id: str) -> Vm:
        """End the session: the browser connection, then the VM. An ended one is 404."""
        vm = await self.get(owner_id, session_id)
        async with self._lock(vm.id):
            await self._drop(vm.id)
            vm = await self._vms.terminate(owner_id, vm.id)
        self.restarts.pop(vm.id, None)
        return vm

    # -- actions -------------------------------------------------------------

    async def navigate(self, owner_id: int, session_id: str, url: str, timeout_ms: float) -> dict[str, Any]:
        vm = await self.get(owner_id, session_id)
        refusal = navigation_refusal(url, self._vms.egress.rules(vm.egress_policy))
        if refusal is not None:
            raise PolicyRefused(f"navigation to {url} refused: {refusal}")
        return await self.act(owner_id, session_id, lambda tab: tab.navigate(url, timeout_ms), loaded=vm)

    async def act(
        self, owner_id: int, session_id: str, action: Callable[[BrowserTab], Awaitable[T]], *, loaded: Vm | None = None
    ) -> T:
        """Run ``action`` on the session's page, connecting (or restarting) its browser first."""
        vm = loaded or await self.get(owner_id, session_id)
        machine = await self._vms.running_machine(owner_id, vm.id, loaded=vm)
        async with self._lock(vm.id):
            tab = await self._tab(vm, machine)
            try:
                return await action(tab)
            except BrowserGone as error:
                await self._restart(vm, machine)
                raise GuestUnavailable(
                    f"browser session {session_id}: the browser crashed and was restarted "
                    f"(restart {self.restarts[vm.id]}); its page was lost, navigate again ({error})"
                ) from error
            except ElementMissing as error:
                raise NotFound(str(error)) from error
            except WaitExpired as error:
                raise WaitTimedOut(str(error)) from error
            except BadSelector as error:
                raise InvalidRequest([FieldProblem(("selector",), str(error))]) from error
            except NavigationFailed as error:
                raise UpstreamFailed(str(error)) from error
            except BrowserError as error:
                raise GuestRefused(str(error)) from error

    async def _tab(self, vm: Vm, machine: Machine) -> BrowserTab:
        live = self._live.get(vm.id)
        if live is not None and live.machine is machine and live.tab.alive:
            return live.tab
        if live is not None and live.machine is machine:
            log.warning("browser session %s: its browser went away; starting it again", vm.session_id)
            await self._restart(vm, machine)
        else:
            await self._connect(vm, machine)
        return self._live[vm.id].tab

    async def _restart(self, vm: Vm, machine: Machine) -> None:
        self.restarts[vm.id] = self.restarts.get(vm.id, 0) + 1
        await self._connect(vm, machine)

    async def _connect(self, vm: Vm, machine: Machine) -> None:
        await self._drop(vm.id)
        tab = BrowserTab(machine.agent, self._host, viewport_of(vm))
        try:
            await tab.open()
        except (BrowserGone, AgentError, AgentTimeout, AgentUnavailable, RuntimeError) as error:
            await tab.close()
            raise GuestUnavailable(f"browser session {vm.session_id}: the browser did not start: {error}") from error
        self._live[vm.id] = _Live(machine, tab)

    async def _drop(self, vm_id: str) -> None:
        live = self._live.pop(vm_id, None)
        if live is not None:
            await live.tab.close()

    async def _forget_ended(self) -> None:
        """Connections of sessions whose VM ended (lifetime, a delete through /v1/vms)."""
        for vm_id, live in list(self._live.items()):
            if self._vms.node.machine(vm_id) is not live.machine:
                await self._drop(vm_id)
                self._locks.pop(vm_id, None)
                self.restarts.pop(vm_id, None)

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())


def viewport_of(vm: Vm) -> Viewport:
    labels = vm.labels or {}
    width, _, height = str(labels.get(VIEWPORT_KEY, "1920x1080")).partition("x")
    agent = labels.get(USER_AGENT_KEY)
    return Viewport(int(width), int(height), str(agent) if agent else None)
