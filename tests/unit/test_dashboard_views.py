"""The dashboard's admin view, the create form's network and storage fields,
a VM's shares, vaults made from the page and the audit pages (in process, fake VMs)."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest
from unit.harness import AppRunner, add_user, key_headers
from unit.test_dashboard import csrf_of, sign_in

from kiln.api.dashboard import audit_pages
from kiln.config import Settings


async def make_vm(client: httpx.AsyncClient, token: str, **fields: str) -> str:
    created = await client.post("/ui/vms", data={"csrf_token": token, "shape": "256x1", **fields})
    assert created.status_code == 303, created.text
    return created.headers["location"].rsplit("/", 1)[1]


async def test_the_admin_sees_everyones_vms_and_volumes_a_user_only_their_own(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        await sign_in(client, api_key=admin_key())
        admin_vm = await make_vm(client, csrf_of(await client.get("/ui/")))
        bob_key = await add_user(settings, "bob")
        async with httpx.AsyncClient(transport=client._transport, base_url="http://kiln") as bob:
            await sign_in(bob, api_key=bob_key)
            bob_vm = await make_vm(bob, csrf_of(await bob.get("/ui/")))
            admin_id = (await client.get("/v1/users/me", headers=key_headers(admin_key()))).json()["id"]
            bob_id = (await bob.get("/v1/users/me", headers=key_headers(bob_key))).json()["id"]
            # Bob: his own VM only, whatever the filter asks; no filter, no owner column.
            for path in ("/ui/", f"/ui/?user={admin_id}", "/ui/vms/rows", f"/ui/vms/rows?user={admin_id}"):
                shown = (await bob.get(path)).text
                assert bob_vm in shown and admin_vm not in shown, path
                assert 'id="user-filter"' not in shown and 'class="owner"' not in shown
            assert (await bob.get("/ui/volumes?user=1")).status_code == 200
            for path in ("/ui/snapshots", "/ui/snapshots/rows", "/ui/volumes"):
                assert 'class="owner"' not in (await bob.get(path)).text, path

        everyone = (await client.get("/ui/")).text
        assert admin_vm in everyone and bob_vm in everyone and 'id="user-filter"' in everyone
        # Another user's VM is listed, not linked: its page is that user's.
        assert f'href="/ui/vms/{bob_vm}"' not in everyone and f'href="/ui/vms/{admin_vm}"' in everyone
        only_bob = (await client.get(f"/ui/vms/rows?user={bob_id}")).text
        assert bob_vm in only_bob and admin_vm not in only_bob and ">bob<" in only_bob
        assert f'hx-get="/ui/vms/rows?user={bob_id}"' in (await client.get(f"/ui/?user={bob_id}")).text
        for path in ("/ui/snapshots", "/ui/volumes"):
            assert 'id="user-filter"' in (await client.get(f"{path}?user={bob_id}")).text, path
        assert f'hx-get="/ui/snapshots/rows?user={bob_id}"' in (await client.get(f"/ui/snapshots?user={bob_id}")).text
        assert (await client.get("/ui/?user=nobody")).status_code == 422
        assert (await client.get("/ui/?user=99999")).status_code == 404


async def test_the_create_form_takes_egress_share_volumes_and_vaults(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        await sign_in(client, api_key=admin_key())
        token = csrf_of(await client.get("/ui/"))
        made = await client.post("/ui/vaults", data={"csrf_token": token, "name": "team"})
        assert made.status_code == 303, made.text
        vault_id = (await client.get("/v1/vaults", headers=auth)).json()["vaults"][0]["id"]
        assert f'value="{vault_id}"' in (await client.get("/ui/")).text  # a box to tick in the form
        vm_id = await make_vm(
            client, token, egress="policy", allow_https="on", allowed_domains="pypi.org, example.com",
            share_port="8080", share_public="on", vault_ids=vault_id,
        )  # fmt: skip
        record = (await client.get(f"/v1/vms/{vm_id}", headers=auth)).json()
        assert record["share"]["port"] == 8080 and record["share"]["is_public"] is True
        assert record["vault_ids"] == [vault_id]
        egress = (await client.get(f"/v1/egress/vm/{vm_id}", headers=auth)).json()
        assert egress["allow_https"] is True and egress["allow_http"] is False
        assert egress["allowed_domains"] == ["pypi.org", "example.com"]
        domain_vm = await make_vm(client, token, share_port="3000", custom_domain="app.example.com")
        domain = (await client.get(f"/v1/vms/{domain_vm}", headers=auth)).json()["custom_domain"]
        assert domain["domain"] == "app.example.com", domain
        for bad in (
            {"custom_domain": "app.example.com"},  # a domain serves a share: none asked for
            {"volumes": "no-colon"},
            {"volumes": "vol-x:relative"},
            {"share_port": "0"},
            {"egress": "policy", "allowed_cidrs": "not-a-cidr"},
            {"vault_ids": "vault-nope"},
        ):
            refused = await client.post("/ui/vms", data={"csrf_token": token, **bad})
            assert 400 <= refused.status_code < 500, (bad, refused.text)
            assert "That did not work" in refused.text


async def test_a_vms_shares_are_listed_made_and_revoked(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        await sign_in(client, api_key=admin_key())
        token = csrf_of(await client.get("/ui/"))
        vm_id = await make_vm(client, token)
        assert "No shares." in (await client.get(f"/ui/vms/{vm_id}")).text
        made = await client.post(f"/ui/vms/{vm_id}/shares", data={"csrf_token": token, "port": "3000"})
        assert made.status_code == 303, made.text
        shown = (await client.get(f"/ui/vms/{vm_id}")).text
        share_id = re.search(r'data-share-id="([^"]+)"', shown)
        assert share_id and f"http://{share_id.group(1)}.kiln.localhost" in shown and "private" in shown
        shares = f"/ui/vms/{vm_id}/shares"
        assert (await client.post(shares, data={"csrf_token": token, "port": "x"})).status_code == 422
        assert (await client.post(shares, data={"port": "3000"})).status_code == 403
        revoked = await client.post(f"/ui/shares/{share_id.group(1)}/revoke", data={"csrf_token": token})
        assert revoked.status_code == 303 and revoked.headers["location"].startswith(f"/ui/vms/{vm_id}")
        assert "Revoke the share" not in (await client.get(f"/ui/vms/{vm_id}")).text
        assert (await client.post("/ui/shares/shr-nope/revoke", data={"csrf_token": token})).status_code == 404


async def test_vaults_made_from_the_page_never_show_a_value(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    value = "sk-typed-into-the-dashboard-42"
    async with run_app() as client:
        await sign_in(client, api_key=admin_key())
        token = csrf_of(await client.get("/ui/vaults"))
        assert (await client.post("/ui/vaults", data={"csrf_token": token, "name": ""})).status_code == 422
        await client.post("/ui/vaults", data={"csrf_token": token, "name": "ci", "description": "for CI"})
        vault_id = re.search(r'data-vault-id="([^"]+)"', (await client.get("/ui/vaults")).text)
        assert vault_id
        base = f"/ui/vaults/{vault_id.group(1)}"
        added = await client.post(f"{base}/credentials", data={"csrf_token": token, "name": "GH_TOKEN", "value": value})
        assert added.status_code == 303, added.text
        service = await client.post(
            f"{base}/services", data={"csrf_token": token, "host": "api.github.com", "credential": "GH_TOKEN"}
        )
        assert service.status_code == 303, service.text
        shown = (await client.get("/ui/vaults")).text
        assert "GH_TOKEN" in shown and "api.github.com" in shown and value not in shown
        bad_name = {"csrf_token": token, "name": "bad name!", "value": value}
        refused = await client.post(f"{base}/credentials", data=bad_name)
        assert refused.status_code == 422 and value not in refused.text


async def test_audit_pages_go_back_a_page_at_a_time(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_pages, "PAGE_SIZE", 2)
    async with run_app() as client:
        await sign_in(client, api_key=admin_key())
        token = csrf_of(await client.get("/ui/"))
        for _ in range(3):
            await make_vm(client, token)
        first = (await client.get("/ui/audit")).text
        ids = re.findall(r'data-event-id="(\d+)"', first)
        assert len(ids) == 2
        older = re.search(r'href="(/ui/audit\?cursor=\d+)" id="older-events"', first)
        assert older, first
        second = (await client.get(older.group(1).replace("&amp;", "&"))).text
        later = re.findall(r'data-event-id="(\d+)"', second)
        assert later and max(map(int, later)) < min(map(int, ids)) and 'id="newest-events"' in second
        assert "vm.created" in (await client.get("/ui/audit?event_group=vm")).text
        assert (await client.get("/ui/audit?status=weird")).status_code == 422
        assert (await client.get("/ui/audit?cursor=abc")).status_code == 422

        bob_key = await add_user(settings, "bob")
        async with httpx.AsyncClient(transport=client._transport, base_url="http://kiln") as bob:
            await sign_in(bob, api_key=bob_key)
            theirs = (await bob.get("/ui/audit?user=1")).text
            assert not set(re.findall(r'data-event-id="(\d+)"', theirs)) & set(ids + later)
            assert 'id="event-user"' not in theirs
