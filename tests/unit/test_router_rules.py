"""The share router's rules without a network: hosts, Kiln's credentials on a request,
what the guest gets, who a private share admits; the idle suspender with a fake runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy
from unit.fakes import FakeHypervisor, FakeImageStore

from kiln.config import Settings
from kiln.crypto import links
from kiln.crypto.credentials import hash_api_key
from kiln.router.access import Gatekeeper, Verdict, credentials_of, strip_cookie
from kiln.router.forward import forwarded_headers
from kiln.router.hosts import share_id_of
from kiln.schemas.vms import VMCreateRequest
from kiln.services.activity import Activity
from kiln.services.auth import AuthService, load_or_create_secret
from kiln.services.shares.wake import IdleSuspender, RouterRequests
from kiln.services.states import VmStatus
from kiln.services.users import UserService
from kiln.services.wiring import build_vm_services
from kiln.store.db import Database
from kiln.store.models import Vm
from kiln.store.repositories import ApiKeyRepository, UserRepository


def test_share_ids_come_from_the_host_header() -> None:
    assert share_id_of("shr-ab12.kiln.localhost:8080", "kiln.localhost") == "shr-ab12"
    assert share_id_of("SHR-AB12.Kiln.Localhost.", "kiln.localhost:8000") == "shr-ab12"
    for host in ("kiln.localhost", "a.b.kiln.localhost", "shr-1.kiln.localhost.evil", "-x.kiln.localhost", ""):
        assert share_id_of(host, "kiln.localhost") is None, host


def test_kiln_credentials_are_found_and_its_cookie_stripped() -> None:
    headers = {"X-API-Key": "kiln_k", "Authorization": "Bearer tok", "Cookie": "a=1; kiln_share=t.1.x; b=2"}
    found = credentials_of(headers, {"kiln_share_token": "link"})
    assert (found.api_key, found.bearer, found.cookie_token, found.link_token) == ("kiln_k", "tok", "t.1.x", "link")
    assert strip_cookie("a=1; kiln_share=t.1.x; b=2") == "a=1; b=2"
    assert strip_cookie("kiln_share=t") == ""
    assert credentials_of({"Cookie": "broken\x00"}, {}).cookie_token is None


def test_the_guest_gets_no_hop_by_hop_headers_and_no_kiln_credentials() -> None:
    given = CIMultiDictProxy(CIMultiDict([
        ("Host", "s.kiln.localhost"), ("Connection", "keep-alive, X-Private"), ("X-Private", "1"),
        ("Keep-Alive", "5"), ("X-API-Key", "kiln_k"), ("Accept", "a"), ("Accept", "b"), ("X-Forwarded-For", "1.2.3.4"),
    ]))  # fmt: skip
    out = forwarded_headers(given, ["X-API-Key"], client="127.0.0.1", scheme="http")
    assert out.getall("Accept") == ["a", "b"] and out["Host"] == "s.kiln.localhost"
    assert not {"Connection", "X-Private", "Keep-Alive", "X-API-Key"} & set(out)
    assert out["X-Forwarded-For"] == "1.2.3.4, 127.0.0.1" and out["X-Forwarded-Proto"] == "http"


async def test_a_private_share_admits_its_owners_key_and_token_and_live_links(
    db: Database, settings: Settings
) -> None:
    async with db.transaction() as session:
        owner = await UserRepository(session).add("owner", None)
        other = await UserRepository(session).add("other", None)
        await ApiKeyRepository(session).add(owner.id, "k", "kiln_owner", hash_api_key("kiln_owner"))
        await ApiKeyRepository(session).add(other.id, "k", "kiln_other", hash_api_key("kiln_other"))
    secret = load_or_create_secret(settings.data_dir / "token-secret")
    auth = AuthService(db, secret, 60)
    link_key = bytes(32)
    gate = Gatekeeper(Database(settings.database, read_only=True), settings.data_dir, link_key)

    def asking(**fields: str) -> Callable[[], object]:
        headers = {"X-API-Key": fields.get("key", ""), "Authorization": fields.get("auth", "")}
        cookie = {"Cookie": f"kiln_share={fields['cookie']}"} if "cookie" in fields else {}
        return lambda: gate.verdict(credentials_of({**headers, **cookie}, fields.get("query", {})), "shr-1", owner.id)  # type: ignore[arg-type]

    assert await asking(key="kiln_owner")() == Verdict.ADMIT
    assert await asking(auth=f"Bearer {auth.issue_token(owner)}")() == Verdict.ADMIT
    assert await asking(key="kiln_other")() == Verdict.NOT_YOURS
    assert await asking(auth=f"Bearer {auth.issue_token(other)}")() == Verdict.NOT_YOURS
    assert await asking(key="kiln_unknown")() == Verdict.SIGN_IN
    assert await asking(auth="Bearer not-a-token")() == Verdict.SIGN_IN
    live = links.sign(link_key, "shr-1", 2**40)
    assert await asking(cookie=live)() == Verdict.ADMIT
    assert await asking(cookie=links.sign(link_key, "shr-1", 1))() == Verdict.SIGN_IN
    assert await asking(cookie=links.sign(link_key, "shr-2", 2**40))() == Verdict.SIGN_IN
    assert gate.is_kiln_token(auth.issue_token(owner)) and not gate.is_kiln_token("app-token")


def test_activity_counts_idleness_from_the_last_touch(tmp_path: Path) -> None:
    now = [100.0]
    activity = Activity(clock=lambda: now[0])
    now[0] = 130.0
    assert activity.idle_seconds("vm-1") == 30.0  # never touched: idle since the start
    activity.touch("vm-1")
    now[0] = 135.0
    assert activity.idle_seconds("vm-1") == 5.0
    activity.forget("vm-1")
    assert activity.idle_seconds("vm-1") == 35.0


async def test_the_idle_suspender_picks_idle_auto_suspend_vms_and_wake_resumes_auto_resume_ones(
    settings: Settings, db: Database, hypervisor: FakeHypervisor, images: FakeImageStore
) -> None:
    """The fake runtime cannot save: suspend and resume are recorded, not run."""
    alice = (await UserService(db).create_user("alice")).id
    vms = build_vm_services(settings, db, hypervisor, images).vms
    now = [1000.0]
    vms.activity = Activity(clock=lambda: now[0])
    suspended: list[str] = []
    resumed: list[str] = []

    async def suspend(owner_id: int, vm_id: str) -> Vm:
        suspended.append(vm_id)
        await vms.set_status(vm_id, "running", VmStatus.SUSPENDING)
        await vms.set_status(vm_id, "suspending", VmStatus.SUSPENDED)
        return await vms.reload(vm_id)

    async def resume(owner_id: int, vm_id: str, wait: bool) -> Vm:
        resumed.append(vm_id)
        await vms.set_status(vm_id, "suspended", VmStatus.RESUMING)
        await vms.set_status(vm_id, "resuming", VmStatus.RUNNING)
        return await vms.reload(vm_id)

    vms.suspend = suspend  # type: ignore[method-assign]
    vms.resume = resume  # type: ignore[method-assign]
    try:
        idle = await vms.create(alice, VMCreateRequest(auto_suspend=True, auto_resume=True), wait=True)
        busy = await vms.create(alice, VMCreateRequest(auto_suspend=True), wait=True)
        kept = await vms.create(alice, VMCreateRequest(), wait=True)
        suspender = IdleSuspender(settings, vms)
        now[0] += settings.auto_suspend_idle_seconds - 1
        assert await suspender.check() == []
        now[0] += 2
        hypervisor.machines[busy.id].fake_agent.in_flight = 1  # a long exec, an attached terminal
        assert await suspender.check() == [idle.id] and suspended == [idle.id]
        assert vms.activity.idle_seconds(busy.id) == 0

        requests = RouterRequests(vms)
        assert await requests.handle({"op": "wake", "vm_id": idle.id}) == {"ok": True, "status": "running"}
        assert resumed == [idle.id]
        await suspend(alice, busy.id)
        refused = await requests.handle({"op": "wake", "vm_id": busy.id})
        assert refused["ok"] is False and "does not resume" in refused["error"] and resumed == [idle.id]
        assert (await requests.handle({"op": "wake", "vm_id": "vm-none"}))["ok"] is False
        now[0] += 50
        await requests.handle({"op": "activity", "vm_ids": [kept.id]})
        assert vms.activity.idle_seconds(kept.id) == 0
        assert (await requests.handle({"op": "nope"}))["ok"] is False
    finally:
        await vms.stop()
