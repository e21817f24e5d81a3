"""Custom domains through a real ``kiln serve``, its share router, a real VM, a
real authoritative DNS server (knot, TSIG) and a real ACME CA (pebble), the
last two in a network namespace of their own (``domain_world.py``).

One server, one world and one VM (running ``guest_web_app.py``) serve the
module; the tests run in order: an ``rfc2136`` domain made with the VM gets
its records on knot, is verified, gets a certificate from pebble and serves
the guest's page over HTTPS (SNI, chain checked against pebble's root); the
renewal loop replaces its certificate and the router serves the new one
without a restart; a wrong TSIG key ends ``failed`` saying so; a ``manual``
domain (through the instavm SDK) lists its records, fails to verify until
they exist, then is issued; another user sees none of it; the domain goes with
its VM. At the end nothing is left: records, certificate files, the router,
the world's servers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from domain_world import ZONE, DomainWorld, missing_tools
from instavm import InstaVM
from live_api import DEFAULTS, SMALL, Api, live_server, process_exists, wait_until
from live_server import ensure_default_image, free_port
from share_fixtures import APP_PORT, start_app
from unit.harness import add_user

from kiln.router.supervisor import RouterSupervisor

pytestmark = pytest.mark.vm

ISSUE_SECONDS = 180.0
RENEW_CHECK_SECONDS = 10
APP_DOMAIN = f"app.{ZONE}"


@pytest.fixture(scope="module")
def domain_world() -> Iterator[DomainWorld]:
    reason = missing_tools()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    world = asyncio.run(DomainWorld.create("kd" + secrets.token_hex(2)))
    try:
        yield world
    finally:
        pids = world.running()
        asyncio.run(world.close())
    assert all(wait_until(lambda pid=pid: not process_exists(pid), 10) for pid in pids), "knot or pebble left running"


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"http": free_port(), "https": free_port()}


@pytest.fixture(scope="module")
def api(domain_world: DomainWorld, ports: dict[str, int]) -> Iterator[Api]:
    env = {
        "KILN_SHARE_HTTP_PORT": str(ports["http"]),
        "KILN_SHARE_HTTPS_PORT": str(ports["https"]),
        "KILN_SHARE_PUBLIC_ADDRESS": domain_world.gateway,
        "KILN_ACME_DIRECTORY": domain_world.directory,
        "KILN_ACME_CA_BUNDLE": str(domain_world.ca_file),
        "KILN_ACME_RENEW_CHECK_SECONDS": str(RENEW_CHECK_SECONDS),
        "KILN_DOMAINS_RESOLVER": domain_world.dns,
        "KILN_DOMAINS_ALLOW_PRIVATE_DNS": "true",
    }
    ensure_default_image(DEFAULTS)
    with live_server("kiln-dom-", env=env) as live:
        yield live
        router_pid = RouterSupervisor(live.settings).pid()
        domains_dir = live.settings.domains_dir
        left = sorted(path.name for path in domains_dir.glob("*/*.pem"))
    assert router_pid is not None and wait_until(lambda: not process_exists(router_pid), 10), "the router was left"
    assert left == [], f"certificate or key files left: {left}"


@pytest.fixture(scope="module")
def vm(api: Api, domain_world: DomainWorld) -> dict:
    created = api.create_ok(
        **SMALL,
        vm_lifetime_seconds=1800,
        share={"port": APP_PORT, "is_public": True},
        custom_domain={"domain": APP_DOMAIN, "dns_provider": "rfc2136", "dns_credentials": domain_world.credentials()},
    )
    start_app(api, created["session_id"])
    return created


@pytest.fixture(scope="module")
def roots(domain_world: DomainWorld) -> str:
    return domain_world.issuing_roots()


def domain(api: Api, domain_id: int) -> dict:
    answer = api.http.get(f"/v1/custom-domains/{domain_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for_status(api: Api, domain_id: int, statuses: set[str]) -> dict:
    deadline = time.monotonic() + ISSUE_SECONDS
    while True:
        record = domain(api, domain_id)
        if record["status"] in statuses or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def https_get(port: int, name: str, path: str, roots: str) -> tuple[int, str, str]:
    """GET through the router's HTTPS port with SNI = ``name``, the chain and the
    name checked against pebble's root: (status, body, serial of the certificate)."""
    context = ssl.create_default_context(cadata=roots)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace"), format(served.serial_number, "x")


def handshake_refused(port: int, name: str) -> bool:
    """The router ends a handshake for a name it holds no certificate of."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            context.wrap_socket(raw, server_hostname=name).close()
            return False
    except (ssl.SSLError, ConnectionError):
        return True


def test_an_rfc2136_domain_made_with_a_vm_is_published_verified_issued_and_served(
    api: Api, vm: dict, domain_world: DomainWorld, ports: dict[str, int], roots: str
) -> None:
    made = vm["custom_domain"]
    assert (made["domain"], made["dns_provider"], made["share_id"]) == (APP_DOMAIN, "rfc2136", vm["share"]["share_id"])
    assert made["status"] in ("verifying", "issued") and "dns_credentials" not in made
    issued = wait_for_status(api, made["id"], {"issued", "failed"})
    assert issued["status"] == "issued", (issued, api.server.log_tail())
    assert issued["last_error"] is None and issued["url"] == f"https://{APP_DOMAIN}:{ports['https']}/"
    assert {(r["type"], r["name"], r["present"]) for r in issued["dns_records"]} >= {("A", APP_DOMAIN, True)}
    # On the authoritative server: the domain points at the router; the challenge is gone again.
    assert domain_world.query(APP_DOMAIN, "A") == [domain_world.gateway]
    assert wait_until(lambda: domain_world.query(f"_acme-challenge.{APP_DOMAIN}", "TXT") == [], 30)

    status, body, serial = https_get(ports["https"], APP_DOMAIN, "/hello", roots)
    assert (status, body) == (200, f"hello from {vm['vm_id']}")
    # The renewal loop may have replaced it since (see the next test).
    assert serial in (issued["certificate"]["serial"], domain(api, made["id"])["certificate"]["serial"])
    # Plain HTTP with the domain's name is sent to its HTTPS URL.
    plain = httpx.get(f"http://127.0.0.1:{ports['http']}/hello?x=1", headers={"Host": APP_DOMAIN})
    assert plain.status_code == 308 and plain.headers["location"] == f"https://{APP_DOMAIN}:{ports['https']}/hello?x=1"

    health = api.http.get(f"/v1/custom-domains/{made['id']}/health").json()
    # GET / of the domain, through the router: whatever the guest's app answers there.
    guest_root = https_get(ports["https"], APP_DOMAIN, "/", roots)[0]
    assert health["healthy"] is True and health["status_code"] == guest_root and health["latency_ms"] > 0, health
    assert health["cert_present"] and health["key_present"] and health["proxy_active"]
    assert api.vm(vm["vm_id"])["custom_domain"]["status"] == "issued"

    # The TSIG secret is sealed at rest and shown nowhere.
    stored = b"".join(path.read_bytes() for path in api.settings.data_dir.glob("kiln.db*"))
    assert domain_world.secret.encode() not in stored
    assert domain_world.secret not in api.http.get("/v1/custom-domains").text
    assert domain_world.secret not in api.http.get(f"/v1/vms/{vm['vm_id']}").text
    key_file = api.settings.domains_dir / "certs" / f"{APP_DOMAIN}.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_the_certificate_is_renewed_and_the_router_serves_the_new_one_without_a_restart(
    api: Api, vm: dict, ports: dict[str, int], roots: str
) -> None:
    # Pebble's certificates here live 20 days: less than the 30 Kiln renews at.
    first = domain(api, vm["custom_domain"]["id"])
    router_pid = RouterSupervisor(api.settings).pid()

    def renewed() -> bool:
        record = domain(api, first["id"])
        return record["status"] == "issued" and record["certificate"]["serial"] != first["certificate"]["serial"]

    assert wait_until(renewed, RENEW_CHECK_SECONDS * 3 + ISSUE_SECONDS), domain(api, first["id"])
    second = domain(api, first["id"])["certificate"]["serial"]
    assert wait_until(lambda: https_get(ports["https"], APP_DOMAIN, "/hello", roots)[2] == second, 30)
    assert RouterSupervisor(api.settings).pid() == router_pid


def test_a_wrong_tsig_key_ends_failed_with_a_clear_last_error(
    api: Api, vm: dict, domain_world: DomainWorld, ports: dict[str, int]
) -> None:
    share = api.http.post("/v1/shares", json={"vm_id": vm["vm_id"], "port": APP_PORT, "is_public": True}).json()
    wrong = domain_world.credentials(secret="d3JvbmcgZG9lcyBub3Qgc2lnbiBhbnl0aGluZyBoZXJl")
    body = {"domain": f"wrong-key.{ZONE}", "share_id": share["share_id"], "dns_provider": "rfc2136"}
    body["dns_credentials"] = wrong
    created = api.http.post("/v1/custom-domains", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "pending"
    assert api.http.post(f"/v1/custom-domains/{created.json()['id']}/verify").json()["status"] == "verifying"
    failed = wait_for_status(api, created.json()["id"], {"issued", "failed"})
    assert failed["status"] == "failed"
    assert "rejected the TSIG signature" in failed["last_error"] and "BADSIG" in failed["last_error"], failed
    assert domain_world.query(f"wrong-key.{ZONE}", "A") == []
    assert handshake_refused(ports["https"], f"wrong-key.{ZONE}")
    # The server refused the update: nothing was published, nothing is left to remove.
    deleted = api.http.delete(f"/v1/custom-domains/{created.json()['id']}").json()
    assert deleted == {"success": True, "id": created.json()["id"], "dns_cleanup_error": None}


def test_a_manual_domain_lists_its_records_and_verifies_once_they_exist(
    api: Api, vm: dict, domain_world: DomainWorld, ports: dict[str, int], roots: str
) -> None:
    sdk = InstaVM(api_key=api.server.admin_key, base_url=api.server.url, auto_start_session=False)
    share = sdk.shares.create(port=APP_PORT, vm_id=vm["vm_id"], is_public=True)
    name = f"manual.{ZONE}"
    created = sdk.custom_domains.create(domain=name, share_id=share["share_id"], dns_provider="manual")
    assert created["status"] == "pending" and created["last_error"] is None, created
    records = {(r["type"], r["name"]): r for r in created["dns_records"]}
    assert records[("A", name)]["value"] == domain_world.gateway
    challenge = records[("TXT", f"_acme-challenge.{name}")]
    assert created["setup"]["txt_record"] == {"name": challenge["name"], "value": challenge["value"]}
    assert [d["domain"] for d in sdk.custom_domains.list()] == [APP_DOMAIN, name]

    # Nothing published yet: the check fails, naming what is missing.
    sdk.custom_domains.verify(created["id"])
    missing = wait_for_status(api, created["id"], {"failed", "issued"})
    assert missing["status"] == "failed" and f"TXT _acme-challenge.{name}" in missing["last_error"], missing
    assert all(record["present"] is False for record in missing["dns_records"])

    domain_world.publish([dict(records[("A", name)]), dict(challenge)])  # what the user does at their DNS host
    issued = sdk.custom_domains.verify_and_wait(created["id"], timeout=ISSUE_SECONDS, poll_interval=0.5)
    assert issued["status"] == "issued", issued
    assert https_get(ports["https"], name, "/hello", roots)[:2] == (200, f"hello from {vm['vm_id']}")
    assert sdk.custom_domains.health(created["id"])["healthy"] is True

    sdk.custom_domains.delete(created["id"])
    assert handshake_refused(ports["https"], name)
    assert not (api.settings.domains_dir / "certs" / f"{name}.pem").exists()


def test_a_domain_is_its_owners_and_claimed_once(api: Api, vm: dict) -> None:
    made = vm["custom_domain"]
    other = {"X-API-Key": asyncio.run(add_user(api.settings, "someone-else"))}
    for method, path in (
        ("GET", f"/v1/custom-domains/{made['id']}"),
        ("POST", f"/v1/custom-domains/{made['id']}/verify"),
        ("GET", f"/v1/custom-domains/{made['id']}/health"),
        ("DELETE", f"/v1/custom-domains/{made['id']}"),
    ):
        assert api.http.request(method, path, headers=other).status_code == 404, (method, path)
    assert api.http.get("/v1/custom-domains", headers=other).json() == []
    theirs = {"domain": "x.example.test", "share_id": made["share_id"], "dns_provider": "manual"}
    assert api.http.post("/v1/custom-domains", json=theirs, headers=other).status_code == 404
    again = api.http.post("/v1/custom-domains", json={**theirs, "domain": APP_DOMAIN.upper() + "."})
    assert again.status_code == 409 and "claimed" in again.json()["detail"]
    assert domain(api, made["id"])["status"] == "issued"


def test_a_domain_goes_with_its_vm(api: Api, vm: dict, domain_world: DomainWorld, ports: dict[str, int]) -> None:
    made = vm["custom_domain"]
    assert api.delete(vm["vm_id"]).status_code == 200
    assert wait_until(lambda: api.http.get(f"/v1/custom-domains/{made['id']}").status_code == 404, 30)
    assert domain_world.query(APP_DOMAIN, "A") == []
    assert domain_world.query(f"_acme-challenge.{APP_DOMAIN}", "TXT") == []
    assert not Path(api.settings.domains_dir / "certs" / f"{APP_DOMAIN}.pem").exists()
    assert handshake_refused(ports["https"], APP_DOMAIN)
