"""The account's SSH keys over HTTP (fake runtime, no gateway process): the SDK's
shapes, what a key must be, ownership; the SSH endpoint VM records name."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest
from fastapi import Request
from unit.harness import AppRunner, add_user, key_headers

from kiln.api.deps import ssh_endpoint
from kiln.config import Settings
from kiln.schemas.vms import VMRecord
from kiln.services.errors import InvalidRequest
from kiln.services.ssh_keys import parse_public_key


def public_line(key: asyncssh.SSHKey, comment: str = "me@laptop") -> str:
    key.set_comment(comment)
    return key.export_public_key("openssh").decode().strip()


async def test_keys_are_added_listed_and_removed_with_the_sdks_shapes(
    run_app: AppRunner, admin_key: Callable[[], str], tmp_path: Path
) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    line = public_line(key)
    pub = tmp_path / "id.pub"
    pub.write_text(line + "\n")
    keygen = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    async with run_app() as client:
        auth = key_headers(admin_key())
        assert (await client.get("/v1/ssh-keys", headers=auth)).json() == {"keys": []}
        added = await client.post("/v1/ssh-keys", json={"public_key": line + "\n"}, headers=auth)
        assert added.status_code == 200, added.text
        record = added.json()
        assert set(record) == {"id", "fingerprint", "comment", "key_type", "public_key", "created_at"}
        # The fingerprint is OpenSSH's own (ssh-keygen -lf prints "256 SHA256:... comment (ED25519)").
        assert record["fingerprint"] == keygen.split()[1]
        assert (record["comment"], record["key_type"]) == ("me@laptop", "ssh-ed25519")
        assert record["public_key"] == " ".join(line.split()[:2])
        assert (await client.get("/v1/ssh-keys", headers=auth)).json() == {"keys": [record]}

        again = await client.post("/v1/ssh-keys", json={"public_key": line}, headers=auth)
        assert again.status_code == 409 and record["fingerprint"] in again.json()["detail"]

        removed = await client.delete(f"/v1/ssh-keys/{record['id']}", headers=auth)
        assert removed.json() == {"success": True}
        assert (await client.delete(f"/v1/ssh-keys/{record['id']}", headers=auth)).status_code == 404
        assert (await client.get("/v1/ssh-keys", headers=auth)).json() == {"keys": []}
        assert (await client.get("/v1/ssh-keys")).status_code == 401


async def test_another_users_key_does_not_exist_for_you(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    line = public_line(asyncssh.generate_private_key("ssh-ed25519"))
    async with run_app() as client:
        mine = (await client.post("/v1/ssh-keys", json={"public_key": line}, headers=key_headers(admin_key()))).json()
        other = key_headers(await add_user(settings, "other"))
        assert (await client.get("/v1/ssh-keys", headers=other)).json() == {"keys": []}
        assert (await client.delete(f"/v1/ssh-keys/{mine['id']}", headers=other)).status_code == 404
        # The same public key may be registered by another user too (it opens only their VMs).
        theirs = await client.post("/v1/ssh-keys", json={"public_key": line}, headers=other)
        assert theirs.status_code == 200 and theirs.json()["id"] != mine["id"]
        assert len((await client.get("/v1/ssh-keys", headers=key_headers(admin_key()))).json()["keys"]) == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("hello", "not an OpenSSH public key"),
        ("ssh-ed25519 AAAA", "not an OpenSSH public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----", "private"),
        ("two keys", "one public key"),
        ("small rsa", "at least 2048 bits"),
    ],
)
async def test_what_is_not_a_usable_public_key_is_a_422_saying_why(
    run_app: AppRunner, admin_key: Callable[[], str], text: str, reason: str
) -> None:
    ed25519 = public_line(asyncssh.generate_private_key("ssh-ed25519"))
    if text == "two keys":
        text = ed25519 + "\n" + ed25519
    elif text == "small rsa":
        text = public_line(asyncssh.generate_private_key("ssh-rsa", key_size=1024))
    async with run_app() as client:
        answer = await client.post("/v1/ssh-keys", json={"public_key": text}, headers=key_headers(admin_key()))
        assert answer.status_code == 422, answer.text
        (problem,) = answer.json()["detail"]
        assert problem["loc"] == ["body", "public_key"] and reason in problem["msg"]
        # Nothing was stored, and the key text is not echoed back.
        assert "input" not in problem
        assert (await client.get("/v1/ssh-keys", headers=key_headers(admin_key()))).json() == {"keys": []}
        empty = await client.post("/v1/ssh-keys", json={"public_key": ""}, headers=key_headers(admin_key()))
        assert empty.status_code == 422


def test_keys_of_each_accepted_kind_parse() -> None:
    for algorithm in ("ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"):
        key = asyncssh.generate_private_key(algorithm)
        parsed = parse_public_key(public_line(key, ""))
        assert parsed.fingerprint == key.get_fingerprint("sha256") and parsed.comment == ""
    with pytest.raises(InvalidRequest):
        parse_public_key(public_line(asyncssh.generate_private_key("ssh-ed25519")).replace("ssh-ed25519", "ssh-dss"))


def _request(host: str, ssh: tuple[str, int] | None) -> Request:
    class State:
        services = type("S", (), {"ssh": ssh})()

    app = type("App", (), {"state": State()})()
    scope = {"type": "http", "app": app, "headers": [(b"host", host.encode())], "path": "/", "query_string": b""}
    scope["server"] = (host, 8000)
    return Request(scope)


def test_vm_records_name_the_ssh_gateway() -> None:
    assert ssh_endpoint(_request("api.example", ("ssh.example", 2222))) == ("ssh.example", 2222)
    # Listening on every address: the name the client reached the API by.
    assert ssh_endpoint(_request("api.example", ("0.0.0.0", 22))) == ("api.example", 22)
    assert ssh_endpoint(_request("api.example", None)) is None
    fields = VMRecord.model_fields
    assert "ssh_host" in fields and "ssh_port" in fields
