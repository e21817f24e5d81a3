"""Vaults end to end: a real ``kiln serve`` with real VMs, its egress daemon, the
unmodified instavm SDK, and an HTTPS echo server in the outside world whose own
CA is the egress proxy's upstream bundle (KILN_EGRESS_CA_BUNDLE).

The echo server answers every request with what it received, the credential
included, as a careless debugging endpoint would: the guest must still never
see the value. One server and one bound VM (the ``node`` image: curl, Python
requests, Node) serve the module; the tests run in order and share them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from instavm import InstaVM
from live_api import SMALL, Api, live_server, wait_until
from outside_world import OutsideWorld
from unit.harness import add_user

from kiln.config import Settings
from kiln.runtime.images import ImageStore
from kiln.runtime.qemu import QemuHypervisor
from kiln.runtime.snapshots import BaseSnapshots, Shape

pytestmark = pytest.mark.vm

VARIANT = "node"
CURL = "curl -sS --max-time 30 "


def secret() -> str:
    return "kvs-" + secrets.token_hex(12)


def pattern(value: str) -> str:
    """A grep pattern that matches ``value`` without containing it, nor letting
    grep make it: GNU grep turns ``[k]vs-…`` into the literal ``kvs-…`` it must
    find (its "must" string, in the process's memory, then in the guest's
    freed pages and in a suspend's saved RAM); ``[kK]vs-…`` leaves it ``vs-…``."""
    return f"[{value[0]}{value[0].upper()}]{value[1:]}"


@dataclass
class Bench:
    api: Api
    world: OutsideWorld
    sdk: InstaVM
    values: list[str] = field(default_factory=list)  # every credential value the tests used
    state: dict[str, str] = field(default_factory=dict)  # ids the tests pass along

    def sh(self, session_id: str, command: str, timeout: int = 120) -> dict:
        response = self.api.http.post(
            "/execute",
            json={"session_id": session_id, "command": command, "language": "bash", "timeout": timeout},
            timeout=timeout + 30,
        )
        assert response.status_code == 200, f"{response.text}\n{self.api.server.log_tail(60)}"
        return response.json()

    def echoed(self, server: str) -> list:
        with self.world.seen.lock:
            return [request for request in self.world.seen.requests if request.server == server]


@pytest.fixture(scope="module")
def bench(world: OutsideWorld) -> Iterator[Bench]:
    settings = Settings()
    store, base = ImageStore(settings), BaseSnapshots(settings, QemuHypervisor(settings))
    for variant in (VARIANT, "default"):  # the default image's for the warm pool
        asyncio.run(base.ensure(store.build(variant), Shape(**SMALL)))
    blocked = [cidr for cidr in settings.net_blocked_cidrs if cidr != "203.0.113.0/24"]
    env = {
        "KILN_UPLINK": world.uplink,
        "KILN_DNS_UPSTREAM": world.dns,
        "KILN_NET_BLOCKED_CIDRS": json.dumps(blocked),  # the world stands for the public internet
        "KILN_EGRESS_CA_BUNDLE": str(world.ca_bundle),
        "KILN_LOG_LEVEL": "debug",
        # One warm VM of the default image in the small shape: a create may be a pool claim.
        "KILN_POOL_SIZE": "1",
        "KILN_DEFAULT_MEMORY_MB": str(SMALL["memory_mb"]),
        "KILN_DEFAULT_VCPU_COUNT": str(SMALL["vcpu_count"]),
    }
    with live_server("kiln-vault-", env=env) as api:
        sdk = InstaVM(api_key=api.server.admin_key, base_url=api.server.url, auto_start_session=False)
        yield Bench(api, world, sdk)


def test_a_bound_vm_calls_services_with_a_credential_it_never_holds(bench: Bench) -> None:
    sdk, value = bench.sdk, secret()
    bench.values.append(value)
    vault = sdk.create_vault("echo", description="the world's echo service")
    credential = sdk.add_vault_credential(vault["id"], name="ECHO_KEY", value=value)
    assert "value" not in credential and value not in json.dumps(credential)
    sdk.add_vault_service(vault["id"], host="api.echo.test", auth_config={"type": "bearer", "token": "ECHO_KEY"})
    sdk.add_vault_service(
        vault["id"], host="*.echo.test", auth_config={"type": "header", "header": "X-Api-Key", "key": "ECHO_KEY"}
    )
    # No egress policy: the VM reaches nothing but its vaults' services.
    vm = sdk.vms.create(wait=True, image_variant=VARIANT, vault_ids=[vault["id"]], **SMALL)
    assert vm["status"] == "running", vm
    bench.state |= {
        "vault": vault["id"], "credential": credential["id"], "vm": vm["vm_id"], "session": vm["session_id"],
    }  # fmt: skip
    session = vm["session_id"]

    clients = {
        "curl": CURL + "https://api.echo.test/curl",
        "requests": "python3 -c " + shlex.quote(
            "import requests; r = requests.get('https://api.echo.test/requests', timeout=30);"
            " print(r.status_code, r.text)"
        ),
        "node": "node -e " + shlex.quote(
            "require('https').get('https://api.echo.test/node', r => { let b = '';"
            " r.on('data', d => b += d); r.on('end', () => console.log(r.statusCode, b)); })"
        ),
    }  # fmt: skip
    for client, command in clients.items():
        result = bench.sh(session, command)
        assert result["exit_code"] == 0, (client, result)
        assert value not in result["stdout"] + result["stderr"], client
        echoed = json.loads(result["stdout"].split(" ", 1)[1] if client != "curl" else result["stdout"])
        assert ["Authorization", "Bearer " + "*" * len(value)] in echoed["headers"], (client, echoed)
        arrived = bench.echoed("echo-https")[-1]
        assert arrived.path == f"/{client}" and arrived.header("Authorization") == [f"Bearer {value}"], client

    # The wildcard's header shape, and plain HTTP.
    wildcard = bench.sh(session, CURL + "https://other.echo.test/wild")
    assert wildcard["exit_code"] == 0 and value not in wildcard["stdout"], wildcard
    assert bench.echoed("echo-https")[-1].header("X-Api-Key") == [value]
    plain = bench.sh(session, CURL + "http://api.echo.test/plain")
    assert plain["exit_code"] == 0 and value not in plain["stdout"], plain
    assert bench.echoed("echo-http")[-1].header("Authorization") == [f"Bearer {value}"]


def test_a_vm_claimed_from_the_warm_pool_trusts_the_ca_and_injects(bench: Bench) -> None:
    log = bench.api.server.log_path
    assert wait_until(lambda: "pool VM " in log.read_text(errors="replace"), 120), "the pool never filled"
    vm = bench.sdk.vms.create(wait=True, vault_ids=[bench.state["vault"]])  # the default image and shape: the pool's
    assert f"vm {vm['vm_id']} claimed from the pool" in log.read_text(errors="replace")
    bench.state["pooled"] = vm["vm_id"]
    result = bench.sh(vm["session_id"], CURL + "https://api.echo.test/pooled")
    assert result["exit_code"] == 0 and bench.values[0] not in result["stdout"], result
    arrived = bench.echoed("echo-https")[-1]
    assert arrived.path == "/pooled" and arrived.header("Authorization") == [f"Bearer {bench.values[0]}"]
    bench.sdk.vms.delete(vm["vm_id"])


def test_the_guest_holds_the_value_nowhere(bench: Bench) -> None:
    session, value = bench.state["session"], bench.values[0]
    # The same searches find a control the guest does hold, in a file, its
    # environment and a process's command line: they would find the value too.
    control = secret()
    searches = [
        "grep -rIls -D skip --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev -e '{}' / | sort",
        "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c -e '{}'",
        "env | grep -c -e '{}'",
    ]
    planted = bench.sh(
        session,
        f"echo {control} > /app/control.txt; export CONTROL={control}; sleep 60 {control} & "
        + "; ".join(search.format(pattern(control)) for search in searches) + "; kill %1",
        timeout=300,
    )
    *files, in_processes, in_env = planted["stdout"].split()
    assert "/app/control.txt" in files and int(in_processes) > 0 and in_env == "1", planted
    found = bench.sh(session, "; ".join(search.format(pattern(value)) for search in searches), timeout=300)
    assert found["stdout"].split() == ["0", "0"], found
    variables = "$SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS $CURL_CA_BUNDLE $PIP_CERT"
    trusted = bench.sh(session, f"echo {variables}")
    assert trusted["stdout"].split() == ["/etc/ssl/certs/ca-certificates.crt"] * 5, trusted


def test_a_rotated_value_goes_into_the_next_request(bench: Bench) -> None:
    new = secret()
    bench.values.append(new)
    bench.sdk.rotate_vault_credential(bench.state["vault"], bench.state["credential"], value=new)
    result = bench.sh(bench.state["session"], CURL + "https://api.echo.test/rotated")
    assert result["exit_code"] == 0 and new not in result["stdout"], result
    assert bench.echoed("echo-https")[-1].header("Authorization") == [f"Bearer {new}"]


def test_an_untrusted_service_gets_no_credential(bench: Bench) -> None:
    bench.sdk.add_vault_service(
        bench.state["vault"], host="untrusted.test", auth_config={"type": "bearer", "token": "ECHO_KEY"}
    )
    result = bench.sh(bench.state["session"], CURL + "-w ' %{http_code}' https://untrusted.test/steal")
    assert result["stdout"].endswith(" 502"), result
    assert "the certificate of untrusted.test" in result["stdout"] and "not trusted" in result["stdout"]
    assert bench.echoed("untrusted-https") == []  # its TLS never finished: no request, no header


def test_the_request_log_lists_the_calls(bench: Bench) -> None:
    logs = bench.sdk.get_vault_request_logs(bench.state["vault"], limit=50)
    calls = {(log["method"], log["host"], log["path"], log["status"], log["credential_name"]) for log in logs}
    for path in ("/curl", "/requests", "/node", "/rotated"):
        assert ("GET", "api.echo.test", path, 200, "ECHO_KEY") in calls, calls
    assert ("GET", "other.echo.test", "/wild", 200, "ECHO_KEY") in calls
    untrusted = next(log for log in logs if log["host"] == "untrusted.test")
    assert untrusted["status"] is None and "not trusted" in untrusted["error"]
    pooled = next(log for log in logs if log["path"] == "/pooled")
    assert pooled["vm_id"] == bench.state["pooled"]
    assert {log["vm_id"] for log in logs} == {bench.state["vm"], bench.state["pooled"]}
    assert not any(value in json.dumps(logs) for value in bench.values)


def test_a_vm_without_vaults_gets_no_injection(bench: Bench) -> None:
    policy = {"allowed_domains": ["api.echo.test"], "allow_https": True}
    vm = bench.sdk.vms.create(wait=True, egress_policy=policy, **SMALL)
    before = len(bench.echoed("echo-https"))
    # Its TLS passes through to the service untouched (the service's own certificate: -k).
    result = bench.sh(vm["session_id"], CURL + "-k https://api.echo.test/unbound")
    assert result["exit_code"] == 0, result
    (arrived,) = bench.echoed("echo-https")[before:]
    assert arrived.path == "/unbound" and arrived.header("Authorization") == []
    bench.sdk.vms.delete(vm["vm_id"])


def test_after_a_suspend_and_resume_the_vm_still_injects(bench: Bench) -> None:
    vm_id = bench.state["vm"]
    assert bench.sdk.vms.suspend(vm_id)["status"] == "suspended"
    assert bench.sdk.vms.resume(vm_id, wait=True)["status"] == "running"
    result = bench.sh(bench.state["session"], CURL + "https://api.echo.test/resumed")
    assert result["exit_code"] == 0, result
    assert bench.echoed("echo-https")[-1].header("Authorization") == [f"Bearer {bench.values[-1]}"]


def test_unbinding_and_deleting_take_effect_at_the_next_request(bench: Bench) -> None:
    vm_id, session, vault_id = bench.state["vm"], bench.state["session"], bench.state["vault"]
    before = len(bench.echoed("echo-https"))
    assert bench.sdk.vms.update(vm_id, vault_ids=[])["vault_ids"] == []
    unbound = bench.sh(session, CURL + "https://api.echo.test/after-unbind")
    assert unbound["exit_code"] == 6, unbound  # deny-all: the name is not even resolved any more
    assert bench.sdk.vms.update(vm_id, vault_ids=[vault_id])["vault_ids"] == [vault_id]
    again = bench.sh(session, CURL + "https://api.echo.test/rebound")
    assert again["exit_code"] == 0, again
    assert bench.sdk.delete_vault(vault_id) is True
    gone = bench.sh(session, CURL + "https://api.echo.test/after-delete")
    assert gone["exit_code"] == 6, gone
    assert [request.path for request in bench.echoed("echo-https")[before:]] == ["/rebound"]
    assert bench.sdk.vms.get(vm_id)["vault_ids"] == []


def test_a_stranger_cannot_read_another_users_vault(bench: Bench) -> None:
    vault = bench.sdk.create_vault("private")
    bench.sdk.add_vault_credential(vault["id"], name="K", value=(value := secret()))
    bench.values.append(value)
    stranger = asyncio.run(add_user(bench.api.settings, "stranger"))
    http = httpx.Client(base_url=bench.api.server.url, headers={"X-API-Key": stranger}, timeout=30)
    for path in ("", "/credentials", "/services", "/discover", "/request-logs"):
        response = http.get(f"/v1/vaults/{vault['id']}{path}")
        assert response.status_code == 404, (path, response.text)
    assert http.get("/v1/vaults").json() == {"vaults": []}
    created = http.post("/v1/vms", json={"vault_ids": [vault["id"]]})
    assert created.status_code == 422 and f"vault {vault['id']} not found" in created.text
    http.close()


def test_no_credential_value_is_in_any_kiln_log_or_file_in_the_clear(bench: Bench) -> None:
    data_dir = bench.api.server.data_dir
    logs = {
        "server": bench.api.server.log_path.read_text(errors="replace"),
        "egress daemon": (data_dir / "net" / "egress.log").read_text(errors="replace"),
    }
    assert "debug" in logs["server"].lower() or "DEBUG" in logs["server"]  # the level this server ran at
    assert "api.echo.test" in logs["egress daemon"]  # it did log the calls
    for value in bench.values:
        for name, text in logs.items():
            assert value not in text, f"a credential value is in the {name}'s log"
        for path in data_dir.rglob("*"):  # the database, feeds, VM disks and saved memory
            if path.is_file():
                assert value.encode() not in path.read_bytes(), f"{path} holds a credential value in the clear"
