"""The dashboard's HTTP rules, in process with fake VMs: sign-in, the cookie, CSRF,
the CSP, tenancy and refusals as 4xx pages (the browser tests are tests/e2e)."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
from unit.harness import AppRunner, add_user, key_headers

from kiln.api.dashboard.session import SessionStore, tokens_match
from kiln.config import Settings

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


async def sign_in(client: httpx.AsyncClient, **fields: str) -> httpx.Response:
    form = await client.get("/ui/login")
    token = TOKEN.search(form.text)
    assert token, form.text
    return await client.post("/ui/login", data={"csrf_token": token.group(1), **fields})


def csrf_of(page: httpx.Response) -> str:
    found = TOKEN.search(page.text)
    assert found, page.text
    return found.group(1)


async def test_signed_out_is_sent_to_sign_in(run_app: AppRunner) -> None:
    async with run_app() as client:
        root = await client.get("/")
        assert root.status_code == 303 and root.headers["location"] == "/ui/"
        page = await client.get("/ui/")
        assert page.status_code == 303 and page.headers["location"] == "/ui/login"
        fragment = await client.get("/ui/vms/rows", headers={"HX-Request": "true"})
        assert fragment.status_code == 401 and fragment.headers["hx-redirect"] == "/ui/login"
        forged = await client.get("/ui/", cookies={"kiln_session": "made-up.0000"})
        assert forged.status_code == 303


async def test_sign_in_with_an_api_key_sets_a_strict_httponly_cookie(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        key = admin_key()
        answer = await sign_in(client, api_key=key)
        assert answer.status_code == 303, answer.text
        cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and "kiln_session=" in v)
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        page = await client.get("/ui/")
        assert page.status_code == 200 and "admin" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in page.text and " on" + "click=" not in page.text
        for path in ("/ui/", "/ui/snapshots", "/ui/keys", "/ui/host"):
            shown = await client.get(path)
            assert shown.status_code == 200, (path, shown.text)
            assert key not in shown.text, path


async def test_sign_in_with_a_password_and_refusals(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        await add_user(settings, "alice", "correct horse")
        wrong = await sign_in(client, username="alice", password="nope")
        assert wrong.status_code == 401 and "Sign-in failed" in wrong.text
        empty = await sign_in(client)
        assert empty.status_code == 400
        no_token = await client.post("/ui/login", data={"api_key": "kiln_x"})
        assert no_token.status_code == 403
        right = await sign_in(client, username="alice", password="correct horse")
        assert right.status_code == 303
        assert "alice" in (await client.get("/ui/")).text


async def test_every_form_needs_the_sessions_csrf_token(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        await sign_in(client, api_key=admin_key())
        refused = await client.post("/ui/vms", data={"shape": "256x1"})
        assert refused.status_code == 403
        refused = await client.post("/ui/vms", data={"shape": "256x1", "csrf_token": "wrong"})
        assert refused.status_code == 403
        refused = await client.post("/ui/logout")
        assert refused.status_code == 403
        assert (await client.get("/ui/")).status_code == 200


async def test_vms_keys_and_bad_input(run_app: AppRunner, admin_key: Callable[[], str], settings: Settings) -> None:
    async with run_app() as client:
        await sign_in(client, api_key=admin_key())
        token = csrf_of(await client.get("/ui/"))
        for bad in ({"shape": "lots"}, {"vm_lifetime_seconds": "soon"}, {"env": "no equals"}, {"metadata": "{"}):
            answer = await client.post("/ui/vms", data={"csrf_token": token, **bad})
            assert 400 <= answer.status_code < 500, (bad, answer.text)
            assert "That did not work" in answer.text
        created = await client.post(
            "/ui/vms", data={"csrf_token": token, "shape": "256x1", "metadata": "team=blue", "env": "A=1"}
        )
        assert created.status_code == 303, created.text
        vm_id = created.headers["location"].rsplit("/", 1)[1]
        assert vm_id in (await client.get("/ui/vms/rows")).text
        assert (await client.get(f"/ui/vms/{vm_id}")).status_code == 200
        assert (await client.get("/ui/vms/vm-nope")).status_code == 404
        host = (await client.get("/ui/host")).text
        assert '<th scope="row">VMs</th><td>1</td>' in host, host

        made = await client.post("/ui/keys", data={"csrf_token": token, "name": "laptop"})
        shown = re.search(r'id="new-key">([^<]+)<', made.text)
        assert shown and shown.group(1).startswith("kiln_")
        assert made.headers["cache-control"] == "no-store"
        assert shown.group(1) not in (await client.get("/ui/keys")).text
        assert (await client.post("/ui/keys/99999999999999999999/revoke", data={"csrf_token": token})).status_code < 500

        # Another user sees none of it, and cannot act on it.
        other = await add_user(settings, "bob")
        async with httpx.AsyncClient(transport=client._transport, base_url="http://kiln") as bob:
            await sign_in(bob, api_key=other)
            assert vm_id not in (await bob.get("/ui/")).text
            assert (await bob.get(f"/ui/vms/{vm_id}")).status_code == 404
            bob_token = csrf_of(await bob.get("/ui/"))
            assert (await bob.post(f"/ui/vms/{vm_id}/delete", data={"csrf_token": bob_token})).status_code == 404
        assert (await client.get(f"/v1/vms/{vm_id}", headers=key_headers(admin_key()))).status_code == 200

        deleted = await client.post(f"/ui/vms/{vm_id}/delete", data={"csrf_token": token})
        assert deleted.status_code == 303
        signed_out = await client.post("/ui/logout", data={"csrf_token": token})
        assert signed_out.status_code == 303
        assert (await client.get("/ui/")).status_code == 303


async def test_vaults_show_names_never_values(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    value = "sk-dashboard-secret-value-123"
    async with run_app() as client:
        auth = key_headers(admin_key())
        vault_id = (await client.post("/v1/vaults", json={"name": "team"}, headers=auth)).json()["id"]
        added = await client.post(
            f"/v1/vaults/{vault_id}/credentials", json={"name": "ECHO_KEY", "value": value}, headers=auth
        )
        assert added.status_code == 200, added.text
        service = await client.post(
            f"/v1/vaults/{vault_id}/services",
            json={"host": "api.echo.test", "auth_config": {"type": "bearer", "token": "ECHO_KEY"}},
            headers=auth,
        )
        assert service.status_code == 200, service.text
        await sign_in(client, api_key=admin_key())
        shown = await client.get("/ui/vaults")
        assert shown.status_code == 200
        assert "ECHO_KEY" in shown.text and "api.echo.test" in shown.text and vault_id in shown.text
        assert value not in shown.text
        volumes = await client.get("/ui/volumes")
        assert volumes.status_code == 200 and "No volumes." in volumes.text


def test_sessions_expire_on_the_servers_clock_and_refuse_forged_cookies() -> None:
    now = [1000.0]
    store = SessionStore(clock=lambda: now[0], lifetime=60)
    session, cookie = store.create(7)
    assert store.get(cookie) == session
    session_id, _, signature = cookie.rpartition(".")
    assert store.get(f"{session_id}.{'0' * len(signature)}") is None
    assert store.get(f"other.{signature}") is None
    assert store.get(session_id) is None and store.get("") is None and store.get(None) is None
    now[0] += 59
    assert store.get(cookie) == session
    now[0] += 1
    assert store.get(cookie) is None  # expired: whatever the cookie's own Max-Age says
    _, second = store.create(7)
    store.end(store.get(second).session_id)  # type: ignore[union-attr]
    assert store.get(second) is None
    assert tokens_match("a", "a") and not tokens_match("", "a") and not tokens_match(None, "a")
