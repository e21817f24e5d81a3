"""Custom domains, the rules: names, records, credentials, the request policy,
the routes over HTTP (fake runtime, no ACME directory, no router process), and
the issuance worker's steps with a fake ACME server, provider and DNS check."""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings
from kiln.domains import names
from kiln.domains.acme_client import Order
from kiln.domains.errors import AcmeError, UpdateRefused
from kiln.domains.lookup import Finding
from kiln.domains.records import DnsRecord, route_record
from kiln.domains.rfc2136 import check_credentials
from kiln.services.domains.issuance import DomainWorker
from kiln.services.domains.policy import check_domain
from kiln.store.db import Database
from kiln.store.models import CustomDomain, SandboxSession, Share, User, Vm

SECRET = "c2VjcmV0LXRzaWcta2V5LWZvci10aGUtdGVzdHMtb25seQ=="
CREDENTIALS = {"server": "192.0.2.53", "key_name": "update.kiln", "secret": SECRET}


# -- names, records, credentials, policy


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("App.Example.COM.", "app.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        (" a-b.c1.io", "a-b.c1.io"),
    ],
)
def test_domain_names_have_one_spelling(given: str, expected: str) -> None:
    assert names.normalize(given) == expected


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "must be a domain"),
        ("localhost", "two labels"),
        ("bücher.example", "punycode"),
        ("*.example.com", "wildcard"),
        ("192.0.2.1", "not an address"),
        ("-app.example.com", "label"),
        ("a." * 127 + "com", "253"),
        ("app.example.123", "all digits"),
        ("app_1.example.com", "label"),
    ],
)
def test_bad_domain_names_say_why(given: str, why: str) -> None:
    with pytest.raises(names.BadDomain, match=why):
        names.normalize(given)


def test_the_route_record_follows_the_public_address() -> None:
    assert route_record("a.example.com", "") is None
    assert route_record("a.example.com", "203.0.113.7") == DnsRecord("A", "a.example.com", "203.0.113.7", "route")
    assert route_record("a.example.com", "2001:db8::1").type == "AAAA"  # type: ignore[union-attr]
    assert route_record("a.example.com", "Router.Example.NET.") == DnsRecord(
        "CNAME", "a.example.com", "router.example.net", "route"
    )


def test_rfc2136_credentials_are_checked_before_anything_is_stored() -> None:
    assert check_credentials(CREDENTIALS) == []
    assert (
        check_credentials(
            CREDENTIALS | {"algorithm": "HMAC-SHA512", "zone": "example.com", "server": "[2001:db8::1]:5353"}
        )
        == []
    )
    problems = dict(
        check_credentials({"server": "ns:99999", "secret": "not base64!", "algorithm": "rot13", "colour": "x"})
    )
    assert set(problems) == {"key_name", "server", "secret", "algorithm", "colour"}
    assert "required" in problems["key_name"] and "1-65535" in problems["server"] and "base64" in problems["secret"]
    assert "hmac-sha256" in problems["algorithm"] and "unknown" in problems["colour"]


def test_the_policy_collects_every_problem(settings: Settings) -> None:
    plan, problems = check_domain(settings, "x.kiln.localhost", "carrier-pigeon", None, ("custom_domain",))
    assert plan is None
    assert {problem.loc for problem in problems} == {("custom_domain", "domain"), ("custom_domain", "dns_provider")}
    _, manual = check_domain(settings, "a.example.com", "manual", {"secret": "x"})
    assert [problem.loc for problem in manual] == [("dns_credentials",)]
    _, missing = check_domain(settings, "a.example.com", "rfc2136", None)
    assert {problem.loc for problem in missing} == {
        ("dns_credentials", key) for key in ("server", "key_name", "secret")
    }
    plan, none = check_domain(settings, "A.example.com", None, None)
    assert none == [] and plan is not None and (plan.domain, plan.provider) == ("a.example.com", "manual")


# -- the routes


async def test_a_vm_made_with_a_custom_domain_and_the_domain_routes(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        body = {
            "share": {"port": 8000, "is_public": True},
            "custom_domain": {"domain": "App.Example.com", "dns_provider": "rfc2136", "dns_credentials": CREDENTIALS},
        }
        created = await client.post("/v1/vms", json=body, headers=auth)
        assert created.status_code == 200, created.text
        made = created.json()["custom_domain"]
        assert (made["domain"], made["share_id"], made["dns_provider"]) == (
            "app.example.com", created.json()["share"]["share_id"], "rfc2136",
        )  # fmt: skip
        assert (
            made["status"] in ("verifying", "failed")
            and made["url"] == f"https://app.example.com:{settings.share_https_port}/"
        )
        assert "dns_credentials" not in made and SECRET not in created.text
        assert "no ACME directory" in made["certificates"]
        listed = (await client.get("/v1/custom-domains", headers=auth)).json()
        assert [d["id"] for d in listed] == [made["id"]] and SECRET not in str(listed)

        # Sealed at rest: no trace of the secret in the database file.
        rows = (
            sqlite3.connect(settings.data_dir / "kiln.db")
            .execute("SELECT dns_credentials FROM custom_domains")
            .fetchall()
        )
        assert rows[0][0].startswith("v1.") and SECRET not in rows[0][0]

        # No ACME directory: verification cannot end issued, and says why.
        async def ended() -> dict[str, Any]:
            while True:
                record = (await client.get(f"/v1/custom-domains/{made['id']}", headers=auth)).json()
                if record["status"] == "failed":
                    return record
                await asyncio.sleep(0.05)

        failed = await asyncio.wait_for(ended(), 30)
        assert "KILN_ACME_DIRECTORY" in failed["last_error"]
        assert (await client.get(f"/v1/vms/{created.json()['vm_id']}", headers=auth)).json()["custom_domain"][
            "status"
        ] == "failed"
        health = (await client.get(f"/v1/custom-domains/{made['id']}/health", headers=auth)).json()
        assert health["healthy"] is False and health["cert_present"] is False

        # The domain goes with its VM.
        await client.delete(f"/v1/vms/{created.json()['vm_id']}", headers=auth)

        async def gone() -> None:
            while (await client.get(f"/v1/custom-domains/{made['id']}", headers=auth)).status_code != 404:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(gone(), 30)


async def test_bad_domain_requests_are_4xx_never_500(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        no_share = await client.post("/v1/vms", json={"custom_domain": {"domain": "a.example.com"}}, headers=auth)
        assert no_share.status_code == 422 and ["body", "custom_domain"] in [
            e["loc"] for e in no_share.json()["detail"]
        ]
        bad = await client.post(
            "/v1/vms",
            json={"share": {"port": 80}, "custom_domain": {"domain": "nope", "dns_provider": "rfc2136"}},
            headers=auth,
        )
        locs = {tuple(error["loc"]) for error in bad.json()["detail"]}
        assert bad.status_code == 422 and ("body", "custom_domain", "domain") in locs
        assert ("body", "custom_domain", "dns_credentials", "secret") in locs
        assert (await client.get("/v1/vms", headers=auth)).json() == []

        vm = (await client.post("/v1/vms", json={"share": {"port": 80}}, headers=auth)).json()
        share_id = vm["share"]["share_id"]
        for body, status in (
            ({"domain": "a.example.com", "share_id": "shr-none"}, 404),
            ({"domain": "a..example.com", "share_id": share_id}, 422),
            ({"domain": "a.example.com", "share_id": share_id, "dns_provider": "bind"}, 422),
            ({"domain": "a.example.com", "share_id": share_id, "dns_credentials": {"a": "b"}}, 422),
            ({"domain": "a.example.com"}, 422),
        ):
            answer = await client.post("/v1/custom-domains", json=body, headers=auth)
            assert answer.status_code == status, (body, answer.text)
        for path in ("/v1/custom-domains/0", f"/v1/custom-domains/{2**70}", "/v1/custom-domains/abc"):
            assert (await client.get(path, headers=auth)).status_code == 422, path
        assert (await client.get("/v1/custom-domains/12345", headers=auth)).status_code == 404
        assert (await client.post("/v1/custom-domains/12345/verify", headers=auth)).status_code == 404


async def test_a_domain_is_one_users_and_claimed_once(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        other = key_headers(await add_user(settings, "mallory"))
        mine = (await client.post("/v1/vms", json={"share": {"port": 80}}, headers=auth)).json()
        theirs = (await client.post("/v1/vms", json={"share": {"port": 80}}, headers=other)).json()
        body = {"domain": "shop.example.com", "share_id": mine["share"]["share_id"], "dns_provider": "manual"}
        created = await client.post("/v1/custom-domains", json=body, headers=auth)
        assert created.status_code == 200, created.text
        record = created.json()
        assert (
            record["status"] == "pending"
            and record["setup"]["verify_endpoint"] == f"/v1/custom-domains/{record['id']}/verify"
        )
        # Another user: the share is not theirs (404), and the domain is claimed (409) even with their own share.
        assert (await client.post("/v1/custom-domains", json=body, headers=other)).status_code == 404
        claimed = await client.post(
            "/v1/custom-domains",
            json=body | {"domain": "SHOP.example.com.", "share_id": theirs["share"]["share_id"]},
            headers=other,
        )
        assert claimed.status_code == 409 and "claimed" in claimed.json()["detail"]
        for method, suffix in (("GET", ""), ("POST", "/verify"), ("GET", "/health"), ("DELETE", "")):
            answer = await client.request(method, f"/v1/custom-domains/{record['id']}{suffix}", headers=other)
            assert answer.status_code == 404, (method, suffix)
        assert (await client.get("/v1/custom-domains", headers=other)).json() == []
        deleted = await client.delete(f"/v1/custom-domains/{record['id']}", headers=auth)
        assert deleted.json() == {"success": True, "id": record["id"], "dns_cleanup_error": None}
        assert (await client.get(f"/v1/custom-domains/{record['id']}", headers=auth)).status_code == 404
        # Released: now anyone may claim it.
        again = await client.post(
            "/v1/custom-domains", json=body | {"share_id": theirs["share"]["share_id"]}, headers=other
        )
        assert again.status_code == 200


async def test_a_user_holds_at_most_the_quota_of_domains(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    settings.quota_custom_domains = 1
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm = (await client.post("/v1/vms", json={"share": {"port": 80}}, headers=auth)).json()
        body = {"domain": "one.example.com", "share_id": vm["share"]["share_id"]}
        assert (await client.post("/v1/custom-domains", json=body, headers=auth)).status_code == 200
        over = await client.post("/v1/custom-domains", json=body | {"domain": "two.example.com"}, headers=auth)
        assert over.status_code == 429 and "at most 1" in over.json()["detail"]


# -- the worker, with a fake ACME server, provider and DNS


class FakeAcme:
    """Orders whose challenge validates when ``valid`` says so; certificates for the CSR's key."""

    def __init__(self, days: int = 90) -> None:
        self.days = days
        self.orders = 0
        self.answered = 0
        self.valid = True
        self.key_of: dict[int, bytes] = {}

    def new_order(self, domain: str, key_pem: bytes) -> Order:
        self.orders += 1
        self.key_of[self.orders] = key_pem
        return Order({"n": self.orders, "domain": domain}, f"challenge-{self.orders}")

    def answer(self, order: Order) -> None:
        self.answered += 1

    def authorizations(self, order: Order) -> tuple[str, str | None]:
        if order.resource["n"] > self.orders:
            raise AcmeError("no such order")
        return ("valid", None) if self.valid or not self.answered else ("invalid", "DNS problem: NXDOMAIN (dns)")

    def finalize(self, order: Order) -> str:
        key = serialization.load_pem_private_key(self.key_of[order.resource["n"]], None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        issuer = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, order.resource["domain"])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake ACME")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(order.resource["domain"])]), critical=False)
            .sign(issuer, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM).decode()


class FakeProvider:
    name = "fake"

    def __init__(self, publishes: bool = True, refuse: str | None = None) -> None:
        self.publishes = publishes
        self.refuse = refuse
        self.zone: dict[tuple[str, str], str] = {}

    async def publish(self, records: Any) -> None:
        if self.refuse:
            raise UpdateRefused(self.refuse)
        self.zone.update({(record.name, record.type): record.value for record in records})

    async def remove(self, records: Any) -> None:
        for record in records:
            self.zone.pop((record.name, record.type), None)

    def servers(self) -> list[tuple[str, int]]:
        return []


class FakeChecker:
    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider

    async def check(self, domain: str, records: Any, also: Any = ()) -> list[Finding]:
        zone = self.provider.zone
        return [Finding(record, zone.get((record.name, record.type)) == record.value, "nothing") for record in records]


async def seed_domain(db: Database, provider: str = "rfc2136") -> int:
    now = datetime.datetime.now(datetime.UTC)
    async with db.transaction() as session:
        session.add(User(id=1, username="alice"))
        await session.flush()
        session.add(SandboxSession(owner_id=1, id="s"))
        await session.flush()
        session.add(
            Vm(
                id="vm-1", owner_id=1, session_id="s", status="running", vcpu_count=1, memory_mb=256,
                image_variant="default", labels={}, expires_at=now + datetime.timedelta(hours=1),
            )
        )  # fmt: skip
        session.add(Share(id="shr-1", owner_id=1, vm_id="vm-1", port=80, is_public=True, status="active"))
        row = CustomDomain(
            owner_id=1, domain="app.example.com", share_id="shr-1", vm_id="vm-1", made_with_vm=False,
            dns_provider=provider, status="verifying", dns_records=[], published=[], created_at=now, updated_at=now,
        )  # fmt: skip
        session.add(row)
        await session.flush()
        return row.id


def worker_with(settings: Settings, db: Database, acme: FakeAcme, provider: FakeProvider) -> DomainWorker:
    settings.acme_directory = "https://acme.invalid/directory"
    settings.share_public_address = "203.0.113.7"
    settings.domains_propagation_seconds = 0
    worker = DomainWorker(settings, db, bytes(32))
    worker.acme = acme  # type: ignore[assignment]
    worker.checker = FakeChecker(provider)  # type: ignore[assignment]
    worker.provider = lambda row: provider  # type: ignore[method-assign]
    return worker


async def run_jobs(worker: DomainWorker) -> None:
    await worker.pass_once()
    await asyncio.gather(*worker._jobs.values())


async def load(db: Database, domain_id: int) -> CustomDomain:
    async with db.transaction() as session:
        row = await session.get(CustomDomain, domain_id)
        assert row is not None
        return row


async def test_a_domain_is_published_checked_issued_and_its_challenge_removed(settings: Settings, db: Database) -> None:
    acme, provider = FakeAcme(), FakeProvider()
    worker = worker_with(settings, db, acme, provider)
    domain_id = await seed_domain(db)
    await run_jobs(worker)
    row = await load(db, domain_id)
    assert (row.status, row.last_error, row.acme_order) == ("issued", None, None)
    assert row.certificate is not None and row.expires_at is not None and row.verified_at is not None
    assert provider.zone == {("app.example.com", "A"): "203.0.113.7"}  # the challenge TXT went after issuance
    assert [record["type"] for record in row.published] == ["A"]
    pem = worker.files.read("app.example.com")
    assert (
        pem is not None
        and b"PRIVATE KEY" in pem
        and worker.files.path("app.example.com").stat().st_mode & 0o777 == 0o600
    )
    assert not worker.files.pending_key_path("app.example.com").exists()

    await worker.release(row, reason="test")
    assert provider.zone == {} and worker.files.read("app.example.com") is None


async def test_a_refused_update_fails_the_domain_with_the_reason(settings: Settings, db: Database) -> None:
    provider = FakeProvider(refuse="the DNS server 192.0.2.53:53 rejected the TSIG signature (BADSIG)")
    worker = worker_with(settings, db, FakeAcme(), provider)
    domain_id = await seed_domain(db)
    await run_jobs(worker)
    row = await load(db, domain_id)
    assert row.status == "failed" and "BADSIG" in (row.last_error or "") and row.progress is None
    assert row.published == []  # refused: nothing to remove later
    assert worker.files.read("app.example.com") is None


async def test_a_manual_domain_keeps_its_challenge_until_it_is_issued(settings: Settings, db: Database) -> None:
    acme, provider = FakeAcme(), FakeProvider(publishes=False)
    worker = worker_with(settings, db, acme, provider)
    domain_id = await seed_domain(db, provider="manual")
    await worker.prepare(domain_id)
    shown = (await load(db, domain_id)).dns_records
    assert {(r["type"], r["value"]) for r in shown} == {("A", "203.0.113.7"), ("TXT", "challenge-1")}

    await run_jobs(worker)  # nothing published yet
    row = await load(db, domain_id)
    assert row.status == "failed" and "TXT _acme-challenge.app.example.com = challenge-1 is not served" in (
        row.last_error or ""
    )
    assert acme.orders == 1 and acme.answered == 0  # never answered before the records are there

    provider.zone.update({(r["name"], r["type"]): r["value"] for r in shown})  # the user publishes them
    async with db.transaction() as session:
        (await session.get(CustomDomain, domain_id)).status = "verifying"  # type: ignore[union-attr]
    await run_jobs(worker)
    row = await load(db, domain_id)
    assert row.status == "issued" and acme.orders == 1  # the same order, the same challenge


async def test_renewal_replaces_the_certificate_and_a_failed_one_keeps_it(settings: Settings, db: Database) -> None:
    acme, provider = FakeAcme(days=10), FakeProvider()  # 10 days left: under the 30 renewal starts at
    worker = worker_with(settings, db, acme, provider)
    domain_id = await seed_domain(db)
    await run_jobs(worker)
    first = (await load(db, domain_id)).certificate
    await run_jobs(worker)
    assert (await load(db, domain_id)).certificate == first  # tried a check interval ago: not yet

    worker._renewal_tried.clear()  # the check interval passed
    await run_jobs(worker)
    renewed = await load(db, domain_id)
    assert renewed.status == "issued" and renewed.certificate != first and acme.orders == 2

    worker._renewal_tried.clear()
    acme.valid = False
    await run_jobs(worker)
    kept = await load(db, domain_id)
    assert kept.status == "issued" and kept.certificate == renewed.certificate
    assert "renewal failed (the certificate in force still serves)" in (kept.last_error or "")
    assert "NXDOMAIN" in (kept.last_error or "")


async def test_a_manual_renewal_waits_for_its_new_record_then_verify_completes_it(
    settings: Settings, db: Database
) -> None:
    acme, provider = FakeAcme(days=10), FakeProvider(publishes=False)
    worker = worker_with(settings, db, acme, provider)
    domain_id = await seed_domain(db, provider="manual")
    await worker.prepare(domain_id)
    provider.zone.update({(r["name"], r["type"]): r["value"] for r in (await load(db, domain_id)).dns_records})
    await run_jobs(worker)
    first = await load(db, domain_id)
    assert first.status == "issued"

    worker._renewal_tried.clear()
    await run_jobs(worker)  # the renewal's new challenge is not published yet
    waiting = await load(db, domain_id)
    assert waiting.status == "issued" and waiting.certificate == first.certificate and waiting.acme_order is not None
    assert "challenge-2" in (waiting.last_error or "") and acme.orders == 2

    provider.zone.update({(r["name"], r["type"]): r["value"] for r in waiting.dns_records})
    worker.renew_now(domain_id)  # what verify does for an issued domain with a renewal waiting
    await asyncio.gather(*worker._jobs.values())
    renewed = await load(db, domain_id)
    assert renewed.status == "issued" and renewed.certificate != first.certificate and renewed.last_error is None
    assert acme.orders == 2  # the waiting order, not a third one
