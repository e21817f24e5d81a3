"""The whole instavm SDK, method by method, against a real ``kiln serve`` with real VMs.

``sdk_contract.toml`` says what each public method of the installed SDK must do
(``sdk_contract.py`` reads it and walks the SDK). A method without a row fails,
so does a row without a method. ``works`` rows are called through the unmodified
SDK, by the recipes below, and the keys the SDK (its CLI, its integrations)
reads are checked; ``refused`` rows must answer a 4xx naming their feature;
``not-done`` rows are listed, not called. The last test prints how many
methods work.

One server and three VMs (the shared session's, one that a session recipe
starts and kills, one the VM recipe creates, clones, suspends and deletes);
every VM is deleted at the end and any process left is destroyed from its run dir.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import httpx
import pytest
import requests
import websockets
from contract_server import SMALL, server, template_snapshot
from instavm import InstaVM
from instavm.webhooks import verify
from live_server import LiveServer
from sdk_contract import REFUSAL_WORDS, call_with_dummies, error_text, load_rows, sdk_methods
from webhook_receiver import receiver

pytestmark = pytest.mark.vm

ROWS = load_rows()
__all__ = ["server", "template_snapshot"]  # the module's live server and a published snapshot (fixtures)
WORKED: set[str] = set()


@dataclass
class World:
    server: LiveServer
    client: InstaVM  # the module's session (its VM is the shared one)
    http: httpx.Client
    scratch: Path

    def new_client(self, **options: object) -> InstaVM:
        return InstaVM(
            api_key=self.server.admin_key, base_url=self.server.url, timeout=600,
            cpu_count=SMALL["vcpu_count"], memory_mb=SMALL["memory_mb"], **options,
        )  # fmt: skip


@pytest.fixture(scope="module")
def world(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=120) as http:
        scratch = tmp_path_factory.mktemp("contract")
        client = World(server, None, http, scratch).new_client(metadata={"suite": "contract"})  # type: ignore[arg-type]
        yield World(server, client, http, scratch)


@pytest.fixture(scope="module")
def bare_client(server: LiveServer) -> InstaVM:
    """A client with a made-up session: refusals never reach a session's VM."""
    client = InstaVM(api_key=server.admin_key, base_url=server.url, timeout=60, auto_start_session=False)
    client.session_id = "contract-no-such-session"
    return client


# -- the table ---------------------------------------------------------------------------


def test_every_sdk_method_has_a_row_and_every_row_a_method() -> None:
    methods = sdk_methods()
    assert not sorted(methods - ROWS.keys()), "SDK methods without a row in sdk_contract.toml"
    assert not sorted(ROWS.keys() - methods), "rows of methods the SDK does not have"
    kinds = {row.kind for row in ROWS.values()}
    assert kinds <= {"works", "refused", "elsewhere", "not-done", "local"}, kinds
    assert all(row.subject for row in ROWS.values() if row.kind not in ("works", "local"))


def test_every_working_row_has_a_recipe_and_every_recipe_a_working_row() -> None:
    covered = [method for methods, _ in RECIPES for method in methods]
    assert len(covered) == len(set(covered)), "a method is in two recipes"
    works = {row.method for row in ROWS.values() if row.kind == "works"}
    assert set(covered) == works, (sorted(works - set(covered)), sorted(set(covered) - works))


def test_elsewhere_rows_name_a_test_that_exists() -> None:
    tests = Path(__file__).parents[2]
    for row in ROWS.values():
        if row.kind == "elsewhere":
            assert (tests / row.subject).is_file(), row


# -- refusals ----------------------------------------------------------------------------


def refused_rows(kind: str) -> list[str]:
    return sorted(row.method for row in ROWS.values() if row.kind == kind)


@pytest.mark.parametrize("method", refused_rows("refused"))
def test_an_unbuilt_feature_is_refused_by_name(
    bare_client: InstaVM, tmp_path: Path, method: str, request: pytest.FixtureRequest
) -> None:
    feature = ROWS[method].subject
    if method == "templates.publish":
        request.getfixturevalue("template_snapshot")  # what its snapshot step finds
    with pytest.raises(Exception) as caught:
        call_with_dummies(bare_client, method, tmp_path)
    text = error_text(caught.value)
    if method.endswith(".head"):
        # A HEAD answer has no body: the SDK can only say "Forbidden"; the status is the refusal.
        assert "Forbidden" in text, text
        return
    assert feature in text and REFUSAL_WORDS in text, text


# -- what works ---------------------------------------------------------------------------


def sessions_and_status(w: World) -> None:
    """A second session, reported on and killed; status keys as openai_agents reads them."""
    tag = uuid.uuid4().hex
    other = w.new_client(metadata={"contract": tag}, auto_start_session=False)
    sid = other.start_session()
    try:
        info = other.get_session_info()
        assert info["session_id"] == sid and info["vm_id"]
        status = other.get_session_status()
        assert status["vm_status"] == "active"
        assert (status["exists"], status["vm_assigned"], status["vm_alive"]) == (True, True, True)
        assert other.is_session_active()
        usage = other.get_usage()
        assert {"cpu_seconds", "memory_mb", "uptime_seconds"} <= usage.keys()
        assert [s["session_id"] for s in other.list_sandboxes(metadata={"contract": tag})] == [sid]
    finally:
        killed = other.kill()
    assert killed["success"] is True
    other.session_id = sid  # kill() forgets it; the status of an ended session is still there
    assert other.get_session_status()["vm_alive"] is False
    assert not other.is_session_active()


def execution(w: World) -> None:
    result = w.client.execute("print(6 * 7)")
    assert (result["stdout"], result["exit_code"]) == ("42\n", 0)
    assert result["execution_time"] >= 0 and result["cpu_time"] >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert list(w.client.execute_streaming("print('streamed')")) == ["streamed\n"]
    task = w.client.execute_async("echo async", language="bash")
    done = w.client.get_task_result(task["task_id"], poll_interval=1, timeout=120)
    assert done["stdout"] == "async\n"


def files(w: World) -> None:
    local = w.scratch / "up.bin"
    local.write_bytes(bytes(range(256)) * 4)
    uploaded = w.client.upload_file(str(local), "/tmp/contract-up.bin")
    assert uploaded["success"] is True
    downloaded = w.client.download_file("/tmp/contract-up.bin", local_path=str(w.scratch / "down.bin"))
    assert downloaded and (w.scratch / "down.bin").read_bytes() == local.read_bytes()


def account(w: World) -> None:
    me = w.client.get_current_user()
    assert {"id", "email", "name", "is_verified"} <= me.keys() and me["name"] == "admin"
    public = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    key = w.client.add_ssh_key(public)
    assert key["fingerprint"] and key["id"]
    assert any(k["id"] == key["id"] for k in w.client.list_ssh_keys())  # the SDK unwraps "keys"
    w.client.delete_ssh_key(key["id"])
    assert all(k["id"] != key["id"] for k in w.client.list_ssh_keys())

    keys = w.client.api_keys
    made = keys.create(name="contract")
    assert made["key"] and made["id"]
    assert keys.get(made["id"])["name"] == "contract"
    assert keys.update(made["id"], name="renamed")["name"] == "renamed"
    assert any(k["id"] == made["id"] for k in keys.list())
    assert keys.delete(made["id"])["success"] is True


def sharing(w: World) -> None:
    """Shares and a custom domain with manual DNS (pending until its records exist)."""
    share = w.client.shares.create(port=8000, session_id=w.client.session_id)
    assert {"share_id", "url", "port", "is_public"} <= share.keys() and share["is_public"] is False
    assert w.client.shares.update(share["share_id"], is_public=True)["is_public"] is True
    app = w.client.get_session_app_url(port=8000)
    assert app["url"]
    domains = w.client.custom_domains
    domain = domains.create(f"c{uuid.uuid4().hex[:8]}.example.test", share["share_id"], "manual")
    assert {"id", "domain", "status"} <= domain.keys()
    assert any(d["id"] == domain["id"] for d in domains.list())
    assert "status" in domains.get(domain["id"])
    assert domains.health(domain["id"]) is not None
    domains.verify(domain["id"])
    domains.delete(domain["id"])
    assert w.client.shares.update(share["share_id"], revoke=True)


def vm_lifecycle(w: World) -> None:
    vms, snapshots = w.client.vms, w.client.snapshots
    created = vms.create(wait=True, metadata={"contract": "vm"}, **SMALL)
    vm_id = created["vm_id"]
    assert created["status"] == "running" and created["session_id"]
    try:
        assert vms.get(vm_id)["status"] == "running"
        assert vm_id in [vm["vm_id"] for vm in vms.list()]
        assert vms.update(vm_id, metadata={"contract": "updated"})["metadata"] == {"contract": "updated"}
        # `instavm vm update --memory-mb` is refused by name, not dropped (no balloon).
        with pytest.raises(requests.HTTPError) as refused:
            vms.update(vm_id, memory_mb=512)
        assert refused.value.response.status_code == 422 and "memory_mb" in refused.value.response.text
        assert vms.stage_env(vm_id, {"CONTRACT_TOKEN": "tok-1"}) == {"staged": ["CONTRACT_TOKEN"]}

        def token() -> str:
            body = {"session_id": created["session_id"], "command": "echo ${CONTRACT_TOKEN:-none}", "language": "bash"}
            return w.http.post("/execute", json=body).json()["stdout"]

        # The next command sees the staged value, the one after it does not.
        assert (token(), token()) == ("tok-1\n", "none\n")
        # Python too: the session's interpreter gets it in os.environ.
        vms.stage_env(vm_id, {"CONTRACT_TOKEN": "tok-2"})
        body = {"session_id": created["session_id"], "command": "import os; print(os.environ['CONTRACT_TOKEN'])"}
        assert w.http.post("/execute", json=body).json()["stdout"] == "tok-2\n"

        snapshot = vms.snapshot(vm_id, name="contract-snap")
        snapshot_id = snapshot.get("snapshot_id") or snapshot["id"]
        assert snapshot["status"] == "ready"
        assert snapshots.get(snapshot_id)["status"] == "ready"
        assert snapshot_id in [s["id"] for s in snapshots.list()]
        # What the CLI's `snapshot ls --type system` and the cookbooks ask for (none published here).
        assert snapshot_id not in [s["id"] for s in snapshots.list(snapshot_type="system")]
        clone = vms.clone(vm_id, snapshot_name="contract-clone")
        assert clone["status"] == "running" and clone["vm_id"] != vm_id
        vms.delete(clone["vm_id"])
        assert vms.suspend(vm_id)["status"] == "suspended"
        assert vms.resume(vm_id)["vm_id"] == vm_id
        assert vms.delete(vm_id)["status"] == "terminated"
        assert vm_id in [vm["vm_id"] for vm in vms.list_all_records()]
        # The clone's snapshot was saved on top of this one's disk: it goes first.
        for child in [s["id"] for s in snapshots.list() if s["name"] == "contract-clone"]:
            snapshots.delete(child)
        assert snapshots.delete(snapshot_id)["success"] is True
    finally:
        if w.http.get(f"/v1/vms/{vm_id}").json().get("status") not in ("terminated", "failed"):
            w.http.delete(f"/v1/vms/{vm_id}")


async def read_until(socket: websockets.ClientConnection, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        message = await asyncio.wait_for(socket.recv(), 60)
        assert isinstance(message, bytes), f"a text frame before {marker!r}: {message!r}"
        seen += message
    return seen


async def exit_frame(socket: websockets.ClientConnection) -> dict:
    while True:
        message = await asyncio.wait_for(socket.recv(), 60)
        if isinstance(message, str):
            return json.loads(message)


def terminals(w: World) -> None:
    """Both scopes: JSON resize frames resize (never typed), the exit frame carries
    the shell's code, a shell program is a login shell."""
    pty, sid = w.client.pty, w.client.session_id
    vm_id = w.client.get_session_status()["vm_id"]
    made = pty.create(sid, cols=80, rows=24)["session_id"]
    assert any(p["session_id"] == made for p in pty.list(sid))
    assert pty.resize(sid, made, cols=100, rows=30)["cols"] == 100
    assert pty.get(sid, made)["alive"] is True

    async def in_session() -> tuple[bytes, dict]:
        async with websockets.connect(pty.ws_url(sid, made)) as socket:
            # Frames are handled in order: the resize is done before the input is typed.
            await socket.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            await socket.send(b"stty size\n")
            seen = await read_until(socket, b"40 120\r\n")
            await socket.send(b"exit 7\n")
            return seen, await exit_frame(socket)

    seen, frame = asyncio.run(in_session())
    assert b"resize" not in seen and frame == {"type": "exit", "exit_code": 7}

    shell = pty.create_for_vm(vm_id, command="/bin/bash")["session_id"]
    assert any(p["session_id"] == shell for p in pty.list_for_vm(vm_id))
    assert pty.get_for_vm(vm_id, shell)["alive"] is True
    assert pty.resize_for_vm(vm_id, shell, cols=90, rows=20)["rows"] == 20

    async def in_vm() -> tuple[bytes, dict]:
        async with websockets.connect(pty.ws_url_for_vm(vm_id, shell)) as socket:
            await socket.send(b"shopt -q login_shell && echo LOGIN-$((40 + 2))\n")
            seen = await read_until(socket, b"LOGIN-42")
            await socket.send(b"exit 3\n")
            return seen, await exit_frame(socket)

    _, frame = asyncio.run(in_vm())
    assert frame == {"type": "exit", "exit_code": 3}
    spare = pty.create_for_vm(vm_id)["session_id"]
    assert pty.kill_for_vm(vm_id, spare)["success"] is True
    spare = pty.create(sid)["session_id"]
    assert pty.kill(sid, spare)["success"] is True


def egress(w: World) -> None:
    """Policies by VM and by session, as the CLI's `egress get` reads them back."""
    vm_id = w.client.get_session_status()["vm_id"]
    w.client.set_vm_egress(
        vm_id, allow_package_managers=False, allow_http=False, allow_https=True, allowed_domains=["example.com"]
    )
    policy = w.client.get_vm_egress(vm_id)
    assert policy["allowed_domains"] == ["example.com"] and policy["allow_https"] is True
    w.client.set_session_egress(
        allow_package_managers=False, allow_http=False, allow_https=False, allowed_cidrs=["203.0.113.7/32"]
    )
    policy = w.client.get_session_egress()
    assert policy["allowed_cidrs"] == ["203.0.113.7/32"] and policy["allowed_domains"] == []
    # Back to nothing: the other recipes' VM reaches nothing outside.
    w.client.set_session_egress(allow_package_managers=False, allow_http=False, allow_https=False)


def vaults(w: World) -> None:
    """A vault with a credential and services, read and undone the SDK's way."""
    c = w.client
    vault = c.create_vault(f"contract-{uuid.uuid4().hex[:6]}", description="contract")
    vid = vault["id"]
    assert any(v["id"] == vid for v in c.list_vaults())
    assert c.get_vault(vid)["name"] == vault["name"]
    assert c.update_vault(vid, description="renamed")["description"] == "renamed"
    credential = c.add_vault_credential(vid, name="CONTRACT_TOKEN", value="s3cret-value")
    assert credential["id"] and "s3cret-value" not in json.dumps(credential)
    assert [cr["name"] for cr in c.list_vault_credentials(vid)] == ["CONTRACT_TOKEN"]
    assert "s3cret" not in json.dumps(c.rotate_vault_credential(vid, credential["id"], value="s3cret-two"))
    bearer = {"type": "bearer", "token": "CONTRACT_TOKEN"}
    service = c.add_vault_service(vid, host="api.example.com", auth_config=bearer)
    catalog = c.get_vault_catalog()
    assert catalog and {"id", "host"} <= catalog[0].keys()
    # A template's service uses the credential its catalog entry names.
    template_key = c.add_vault_credential(vid, name=catalog[0]["credential_key"], value="template-secret")
    c.add_vault_services_from_templates(vid, [catalog[0]["id"]])
    hosts = [sv["host"] for sv in c.list_vault_services(vid)]
    assert "api.example.com" in hosts and catalog[0]["host"] in hosts
    assert isinstance(c.discover_vault(vid), dict)
    assert c.get_vault_request_logs(vid, limit=10) == []
    assert c.delete_vault_service(vid, service["id"])
    assert c.delete_vault_credential(vid, credential["id"])
    assert [cr["id"] for cr in c.list_vault_credentials(vid)] == [template_key["id"]]
    assert c.delete_vault(vid)
    assert all(v["id"] != vid for v in c.list_vaults())


def volumes(w: World) -> None:
    """A volume's files and checkpoints, and a hot mount into the shared VM."""
    vols, vms = w.client.volumes, w.client.vms
    volume = vols.create(f"contract-{uuid.uuid4().hex[:6]}", quota_bytes=64 * 1024 * 1024)
    vid = volume["id"]
    try:
        assert any(v["id"] == vid for v in vols.list())
        assert vols.get(vid)["quota_bytes"] == 64 * 1024 * 1024
        assert vols.update(vid, name="contract-renamed")["name"] == "contract-renamed"
        local = w.scratch / "vol.txt"
        local.write_text("on the volume\n")
        vols.upload_file(vid, str(local), "dir/vol.txt")
        assert "dir/vol.txt" in [f["path"].lstrip("/") for f in vols.list_files(vid)]
        vols.download_file(vid, "dir/vol.txt", local_path=str(w.scratch / "vol-back.txt"))
        assert (w.scratch / "vol-back.txt").read_text() == "on the volume\n"
        checkpoint = vols.create_checkpoint(vid, name="cp1")
        assert any(cp["id"] == checkpoint["id"] for cp in vols.list_checkpoints(vid))
        vols.delete_checkpoint(vid, checkpoint["id"])
        vols.delete_file(vid, "dir/vol.txt")
        vm_id = w.client.get_session_status()["vm_id"]
        vms.mount_volume(vm_id, vid, "/mnt/contract")
        assert any(m.get("volume_id") == vid for m in vms.list_volumes(vm_id))
        listing = w.client.execute("ls -d /mnt/contract && echo mounted", language="bash")
        assert "mounted" in listing["stdout"]
        vms.unmount_volume(vm_id, vid, "/mnt/contract")
        assert all(m.get("volume_id") != vid for m in vms.list_volumes(vm_id))
    finally:
        vols.delete(vid)


def events_and_webhooks(w: World) -> None:
    """The audit log, the usage breakdown, and an endpoint's whole life with a
    receiver on loopback (the server allows private webhook destinations)."""
    audit = w.client.audit
    assert "vm" in audit.catalog()["catalog"]
    page = audit.events(event_group="vm", limit=2)
    assert page["items"] and "next_cursor" in page, page
    first = page["items"][0]
    assert audit.get_event(first["id"])["event_type"] == first["event_type"]
    assert {"vms", "totals", "total_days"} <= w.client.get_usage_breakdown(days=1).keys()

    hooks = w.client.webhooks
    with receiver() as hook:
        made = hooks.create_endpoint(hook.url, description="contract", event_patterns=["snapshot.ready"])
        endpoint_id = made["id"]
        assert made["secret"].startswith("whsec_")
        assert hooks.get_endpoint(endpoint_id)["url"] == hook.url
        assert any(item["id"] == endpoint_id for item in hooks.list_endpoints())
        assert hooks.update_endpoint(endpoint_id, description="renamed")["description"] == "renamed"
        secret = hooks.rotate_secret(endpoint_id)["secret"]
        assert secret != made["secret"]
        assert hooks.verify_endpoint(endpoint_id)["status"] == "verified"
        queued = hooks.send_test_event(endpoint_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = hooks.list_deliveries(endpoint_id=endpoint_id)["items"]
            if any(item["id"] == queued["id"] and item["status"] == "succeeded" for item in items):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the test event was not delivered: {items}")
        assert hooks.replay_delivery(queued["id"])["id"] != queued["id"]
        assert verify(hook.received[-1].headers, hook.received[-1].body, secret)["event_type"] == "webhook.test"
        hooks.delete_endpoint(endpoint_id)
    assert all(item["id"] != endpoint_id for item in hooks.list_endpoints())


# Each recipe names the methods it calls; together they cover every "works" row.
RECIPES: list[tuple[tuple[str, ...], Callable[[World], None]]] = [
    (("start_session", "get_session_info", "get_session_status", "is_session_active", "get_usage",
      "list_sandboxes", "kill"), sessions_and_status),
    (("execute", "execute_streaming", "execute_async", "get_task_result"), execution),
    (("upload_file", "download_file"), files),
    (("get_current_user", "add_ssh_key", "list_ssh_keys", "delete_ssh_key", "api_keys.create",
      "api_keys.get", "api_keys.update", "api_keys.list", "api_keys.delete"), account),
    (("shares.create", "shares.update", "get_session_app_url", "custom_domains.create", "custom_domains.list",
      "custom_domains.get", "custom_domains.health", "custom_domains.verify", "custom_domains.delete"), sharing),
    (("vms.create", "vms.get", "vms.list", "vms.update", "vms.stage_env", "vms.snapshot", "snapshots.get",
      "snapshots.list", "vms.clone", "vms.suspend", "vms.resume", "vms.delete", "vms.list_all_records",
      "snapshots.delete"), vm_lifecycle),
    (("pty.create", "pty.list", "pty.resize", "pty.get", "pty.ws_url", "pty.create_for_vm", "pty.list_for_vm",
      "pty.get_for_vm", "pty.resize_for_vm", "pty.ws_url_for_vm", "pty.kill_for_vm", "pty.kill"), terminals),
    (("set_vm_egress", "get_vm_egress", "set_session_egress", "get_session_egress"), egress),
    (("create_vault", "list_vaults", "get_vault", "update_vault", "add_vault_credential", "list_vault_credentials",
      "rotate_vault_credential", "add_vault_service", "get_vault_catalog", "add_vault_services_from_templates",
      "list_vault_services", "discover_vault", "get_vault_request_logs", "delete_vault_service",
      "delete_vault_credential", "delete_vault"), vaults),
    (("volumes.create", "volumes.list", "volumes.get", "volumes.update", "volumes.upload_file", "volumes.list_files",
      "volumes.download_file", "volumes.create_checkpoint", "volumes.list_checkpoints", "volumes.delete_checkpoint",
      "volumes.delete_file", "vms.mount_volume", "vms.list_volumes", "vms.unmount_volume", "volumes.delete"),
     volumes),
    (("audit.catalog", "audit.events", "audit.get_event", "get_usage_breakdown", "webhooks.create_endpoint",
      "webhooks.get_endpoint", "webhooks.list_endpoints", "webhooks.update_endpoint", "webhooks.rotate_secret",
      "webhooks.verify_endpoint", "webhooks.send_test_event", "webhooks.list_deliveries", "webhooks.replay_delivery",
      "webhooks.delete_endpoint"), events_and_webhooks),
]  # fmt: skip


@pytest.mark.parametrize(("methods", "recipe"), RECIPES, ids=[recipe.__name__ for _, recipe in RECIPES])
def test_working_methods_work(world: World, methods: tuple[str, ...], recipe: Callable[[World], None]) -> None:
    recipe(world)
    WORKED.update(methods)


def test_zz_count_of_working_methods(capsys: pytest.CaptureFixture[str]) -> None:
    counts = {kind: sum(row.kind == kind for row in ROWS.values()) for kind in sorted({r.kind for r in ROWS.values()})}
    with capsys.disabled():
        print(f"\nSDK contract: {len(WORKED)} of {len(ROWS)} SDK methods work against real VMs; table: {counts}")
