"""The instavm CLI, command by command, against a real ``kiln serve`` with real VMs.

``cli_contract.toml`` says what each leaf command of the installed CLI must do
(``cli_contract.py`` walks the CLI's parser). The CLI runs as a subprocess, as
a user runs it: ``INSTAVM_BASE_URL`` and ``INSTAVM_API_KEY`` in its
environment, its own ``HOME`` (so no profile of this machine's user leaks in).
``instavm pty`` runs under ``script``, which gives it the terminal it insists on.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO

import pytest
from cli_contract import cli_commands, dummy_argv, load_rows
from contract_server import CONTRACT_TEMPLATE, SMALL, server, template_snapshot
from devbox_manifest import write_manifest
from instavm_cli import INSTAVM, Cli
from live_server import LiveServer
from webhook_receiver import receiver

pytestmark = pytest.mark.vm

ROWS = load_rows()
COMMANDS = cli_commands()
WORKED: set[str] = set()
__all__ = ["server", "template_snapshot"]  # the module's live server and a published snapshot (fixtures)


@pytest.fixture(scope="module")
def cli(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli.of(server.url, server.admin_key, tmp_path_factory.mktemp("cli-home"))


def test_every_cli_command_has_a_row_and_every_row_a_command() -> None:
    assert not sorted(COMMANDS.keys() - ROWS.keys()), "CLI commands without a row in cli_contract.toml"
    assert not sorted(ROWS.keys() - COMMANDS.keys()), "rows of commands the CLI does not have"
    assert {row.kind for row in ROWS.values()} <= {"works", "refused", "elsewhere", "not-done", "local"}
    assert all(row.subject for row in ROWS.values() if row.kind not in ("works", "local"))
    tests = Path(__file__).parents[2]
    assert all((tests / row.subject).is_file() for row in ROWS.values() if row.kind == "elsewhere")


def rows_of(kind: str) -> list[str]:
    return sorted(row.method for row in ROWS.values() if row.kind == kind)


# Refusals that need a real session: these desktop commands read its VM first
# (test_desktop_commands_on_a_session_vm runs them).
REFUSED_ON_A_SESSION = {"desktop start", "desktop viewer"}
REFUSALS_SEEN: set[str] = set()


def assert_refused(runner: Cli, command: str, *argv: str) -> None:
    done = runner.run(*command.split(), *argv, timeout=60)
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert ROWS[command].subject in said, said
    REFUSALS_SEEN.add(command)


@pytest.mark.parametrize("command", sorted(set(rows_of("refused")) - REFUSED_ON_A_SESSION))
def test_a_command_of_an_unbuilt_feature_says_so(
    cli: Cli, command: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # `login` with a key configured only says so; without one it asks the server.
    runner = Cli({k: v for k, v in cli.env.items() if k != "INSTAVM_API_KEY"}) if command == "login" else cli
    argv = dummy_argv(command, COMMANDS[command])[len(command.split()) :]
    if command == "template publish":
        # A devbox manifest whose system snapshot is published: publish gets past its snapshot step.
        request.getfixturevalue("template_snapshot")
        argv = [str(write_manifest(tmp_path / "template", CONTRACT_TEMPLATE))]
    assert_refused(runner, command, *argv)


def test_vm_commands_work(cli: Cli) -> None:
    """create, ls, vm update/suspend/resume, snapshot create/get/ls/rm, clone, rm, exec, devbox ls."""
    assert "Name: admin" in cli.ok("whoami")  # the account's keys as the CLI prints them
    created = cli.json("create", "--memory", str(SMALL["memory_mb"]), "--vcpu", str(SMALL["vcpu_count"]))
    assert isinstance(created, dict)
    vm_id = created["vm_id"]
    try:
        assert vm_id in cli.ok("ls") and vm_id in cli.ok("ls", "-a")
        assert "snapshot_name=kept" in cli.ok("vm", "update", vm_id, "--snapshot-name", "kept")
        refused = cli.run("vm", "update", vm_id, "--memory-mb", "512")
        assert refused.returncode != 0 and "memory_mb" in refused.stderr  # refused by name, not dropped
        snapshot = cli.json("snapshot", "create", vm_id, "--name", "cli-contract")
        assert isinstance(snapshot, dict)
        snapshot_id = snapshot.get("snapshot_id") or snapshot["id"]
        assert "ready" in cli.ok("snapshot", "get", snapshot_id)
        assert snapshot_id in cli.ok("snapshot", "ls")
        assert snapshot_id not in cli.ok("snapshot", "ls", "--type", "system")  # served: no 422
        clone = cli.json("clone", vm_id)
        assert isinstance(clone, dict) and clone["vm_id"] != vm_id
        cli.ok("rm", clone["vm_id"])
        assert "suspended" in cli.ok("vm", "suspend", vm_id)
        cli.ok("vm", "resume", vm_id)
        assert "No devboxes" in cli.ok("devbox", "ls")
    finally:
        cli.run("rm", vm_id)
    listed = cli.json("snapshot", "ls")
    assert isinstance(listed, dict)
    for child in [s["id"] for s in listed["snapshots"] if s["source_vm_id"] == vm_id and s["id"] != snapshot_id]:
        cli.run("snapshot", "rm", child)  # the clone's snapshot sits on top of ours
    cli.ok("snapshot", "rm", snapshot_id)
    WORKED.update({"whoami", "create", "ls", "vm update", "snapshot create", "snapshot get", "snapshot ls",
                   "clone", "rm", "vm suspend", "vm resume", "devbox ls", "snapshot rm"})  # fmt: skip


def test_exec_runs_in_a_session(cli: Cli) -> None:
    """`exec` starts a session (its VM goes with the server's teardown) and runs code in it."""
    assert "42" in cli.ok("exec", "--cmd", "print(6 * 7)")
    assert "from-bash" in cli.ok("exec", "--cmd", "echo from-bash", "--language", "bash")
    WORKED.add("exec")


def test_shares_and_domains_work(cli: Cli) -> None:
    created = cli.json("create", "--memory", str(SMALL["memory_mb"]), "--vcpu", str(SMALL["vcpu_count"]))
    assert isinstance(created, dict)
    vm_id = created["vm_id"]
    try:
        share = cli.json("share", "create", vm_id, "8000")
        assert isinstance(share, dict)
        share_id = share["share_id"]
        assert cli.json("share", "set-public", share_id)["is_public"] is True  # type: ignore[index]
        assert cli.json("share", "set-private", share_id)["is_public"] is False  # type: ignore[index]
        name = f"c{uuid.uuid4().hex[:8]}.example.test"
        domain = cli.json("domain", "create", share_id, name, "--dns-provider", "manual")
        assert isinstance(domain, dict)
        domain_id = str(domain["id"])
        assert name in cli.ok("domain", "list")
        cli.run("domain", "verify", domain_id)  # pending: its records do not exist; the call is what counts
        cli.ok("domain", "health", domain_id)
        cli.ok("domain", "delete", domain_id, "--yes")
        cli.ok("share", "revoke", share_id)
    finally:
        cli.run("rm", vm_id)
    WORKED.update({"share create", "share set-public", "share set-private", "share revoke", "domain create",
                   "domain list", "domain verify", "domain health", "domain delete"})  # fmt: skip


def test_pty_exits_with_the_shells_exit_code(cli: Cli, tmp_path: Path) -> None:
    created = cli.json("create", "--memory", str(SMALL["memory_mb"]), "--vcpu", str(SMALL["vcpu_count"]))
    assert isinstance(created, dict)
    vm_id = created["vm_id"]
    # `script` gives the CLI a terminal; what is written to it goes to the VM's shell,
    # each line once the shell has shown that it reads (typed earlier, the CLI's own
    # terminal would take it before the CLI has switched it to raw mode).
    shell = subprocess.Popen(
        ["script", "-qec", f"{INSTAVM} pty {vm_id}", "/dev/null"],
        env=cli.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert shell.stdin is not None and shell.stdout is not None
    try:
        seen = read_until(shell.stdout, b"/app# ")
        shell.stdin.write(b"echo in-the-vm-$((40 + 2))\n")
        shell.stdin.flush()
        seen += read_until(shell.stdout, b"in-the-vm-42")
        shell.stdin.write(b"exit 5\n")
        # `script` itself stays until its input ends, whatever its child does.
        shell.stdin.close()
        assert shell.wait(timeout=120) == 5, seen + shell.stdout.read()
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        cli.run("rm", vm_id)
    WORKED.add("pty")


def test_egress_vault_and_volume_commands_work(cli: Cli, tmp_path: Path) -> None:
    created = cli.json("create", "--memory", str(SMALL["memory_mb"]), "--vcpu", str(SMALL["vcpu_count"]))
    assert isinstance(created, dict)
    vm_id = created["vm_id"]
    try:
        cli.ok("egress", "set", "--vm", vm_id, "--no-allow-package-managers", "--deny-http", "--domain", "example.com")
        assert "example.com" in cli.ok("egress", "get", "--vm", vm_id)
        cli.ok("egress", "set", "--session", created["session_id"], "--deny-http", "--deny-https")
        assert "allow_https" in json.dumps(cli.json("egress", "get", "--session", created["session_id"]))

        vault = cli.json("vault", "create", f"cli-{uuid.uuid4().hex[:6]}", "--description", "cli contract")
        assert isinstance(vault, dict)
        vid = vault["id"]
        assert vid in cli.ok("vault", "list") and "cli contract" in cli.ok("vault", "get", vid)
        cli.ok("vault", "update", vid, "--description", "renamed")
        secret = cli.json("vault", "secret", "set", vid, "CLI_TOKEN", "--value", "cli-s3cret")
        assert isinstance(secret, dict) and "cli-s3cret" not in json.dumps(secret)
        assert "CLI_TOKEN" in cli.ok("vault", "secret", "list", vid)
        cli.ok("vault", "secret", "rotate", vid, secret["id"], "--value", "cli-s3cret-2")
        service = cli.json("vault", "service", "add", vid, "--host", "api.example.com", "--credential", "CLI_TOKEN")
        assert isinstance(service, dict)
        assert "api.example.com" in cli.ok("vault", "service", "list", vid)
        assert cli.ok("vault", "catalog")
        cli.ok("vault", "discover", vid)
        cli.ok("vault", "logs", vid)
        cli.ok("vault", "service", "remove", vid, service["id"])
        cli.ok("vault", "secret", "delete", vid, secret["id"], "--yes")
        cli.ok("vault", "delete", vid, "--yes")

        volume = cli.json("volume", "create", f"cli-{uuid.uuid4().hex[:6]}", "--quota", str(64 * 1024 * 1024))
        assert isinstance(volume, dict)
        volume_id = volume["id"]
        assert volume_id in cli.ok("volume", "ls") and volume_id in cli.ok("volume", "get", volume_id)
        cli.ok("volume", "update", volume_id, "--name", "cli-renamed")
        local = tmp_path / "up.txt"
        local.write_text("from the cli\n")
        cli.ok("volume", "files", "upload", volume_id, str(local), "--path", "up.txt")
        assert "up.txt" in cli.ok("volume", "files", "ls", volume_id)
        cli.ok("volume", "files", "download", volume_id, "up.txt", "--out", str(tmp_path / "down.txt"))
        assert (tmp_path / "down.txt").read_text() == "from the cli\n"
        checkpoint = cli.json("volume", "checkpoint", "create", volume_id, "--name", "cp")
        assert isinstance(checkpoint, dict)
        assert checkpoint["id"] in cli.ok("volume", "checkpoint", "ls", volume_id)
        cli.ok("volume", "checkpoint", "rm", volume_id, checkpoint["id"])
        cli.ok("volume", "files", "rm", volume_id, "up.txt")
        cli.ok("volume", "rm", volume_id)
    finally:
        cli.run("rm", vm_id)
    WORKED.update({"egress set", "egress get", "vault create", "vault list", "vault get", "vault update",
                   "vault secret set", "vault secret list", "vault secret rotate", "vault service add",
                   "vault service list", "vault catalog", "vault discover", "vault logs", "vault service remove",
                   "vault secret delete", "vault delete", "volume create", "volume ls", "volume get",
                   "volume update", "volume files upload", "volume files ls", "volume files download",
                   "volume checkpoint create", "volume checkpoint ls", "volume checkpoint rm", "volume files rm",
                   "volume rm"})  # fmt: skip


def test_events_webhooks_and_usage_work(cli: Cli) -> None:
    """The audit log, an endpoint's whole life with a receiver on loopback (the
    server allows private webhook destinations), the usage breakdown."""
    with receiver() as hook:
        made = cli.json("webhooks", "create", hook.url, "--description", "cli", "--event", "snapshot.ready")
        assert isinstance(made, dict) and made["secret"].startswith("whsec_")
        endpoint = str(made["id"])
        assert endpoint in cli.ok("webhooks", "list")
        assert cli.json("webhooks", "get", endpoint)["url"] == hook.url  # type: ignore[index]
        assert cli.json("webhooks", "update", endpoint, "--description", "renamed")["description"] == "renamed"  # type: ignore[index]
        assert cli.json("webhooks", "rotate-secret", endpoint)["secret"] != made["secret"]  # type: ignore[index]
        assert cli.json("webhooks", "verify", endpoint)["status"] == "verified"  # type: ignore[index]
        queued = cli.json("webhooks", "test", endpoint)
        assert isinstance(queued, dict)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = cli.json("webhooks", "deliveries", "--endpoint", endpoint)
            assert isinstance(listed, dict)
            if any(item["id"] == queued["id"] and item["status"] == "succeeded" for item in listed["items"]):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the test event was not delivered: {listed}")
        assert cli.json("webhooks", "replay", str(queued["id"]))["id"] != queued["id"]  # type: ignore[index]
        cli.ok("webhooks", "delete", endpoint)
    assert endpoint not in cli.ok("webhooks", "list")
    # One JSON object a line; the endpoint's life above was recorded with each change.
    tail = cli.ok("events", "tail", "--once", "--group", "webhook", "--limit", "5", "--json")
    events = [json.loads(line) for line in tail.splitlines() if line.strip()]
    assert {"webhook.endpoint_created", "webhook.test"} <= {event["event_type"] for event in events}, tail
    got = cli.json("events", "get", str(events[0]["id"]))
    assert isinstance(got, dict) and got["event_type"] == events[0]["event_type"]
    assert "snapshot.ready" in cli.ok("events", "catalog")
    assert "CPU hours" in cli.ok("billing", "usage", "--days", "1")
    WORKED.update({"events tail", "events get", "events catalog", "webhooks create", "webhooks list",
                   "webhooks get", "webhooks update", "webhooks delete", "webhooks verify",
                   "webhooks rotate-secret", "webhooks test", "webhooks deliveries", "webhooks replay",
                   "billing usage"})  # fmt: skip


def test_desktop_commands_on_a_session_vm(cli: Cli) -> None:
    """A desktop is a session's VM of the computer-use image, which Kiln does not
    build. On a session of the default image, `desktop status` and `desktop stop`
    do what they say (its VM's status, without a viewer; the VM stopped); `desktop
    viewer` of it, and `desktop start` of it once stopped, get computer use's refusal."""
    created = cli.json("create", "--memory", str(SMALL["memory_mb"]), "--vcpu", str(SMALL["vcpu_count"]))
    assert isinstance(created, dict)
    session_id, vm_id = created["session_id"], created["vm_id"]
    try:
        status = cli.ok("desktop", "status", vm_id)
        assert f"Session: {session_id}\nVM: {vm_id}\nStatus: active\n" == status, status
        assert_refused(cli, "desktop viewer", vm_id)
        assert f"Stopping {vm_id}" in cli.ok("desktop", "stop", vm_id)
        assert "Desktop is already stopped." in cli.ok("desktop", "stop", vm_id)
        assert_refused(cli, "desktop start", vm_id)  # a new VM of the computer-use image
    finally:
        cli.run("rm", vm_id)
    WORKED.update({"desktop status", "desktop stop"})


# A cookbook that needs a vault for one host (and runs nothing here: vault setup provisions no VM).
VAULTED_COOKBOOK = """\
schema_version: 1
slug: vaulted
title: Vaulted
version: "1.0.0"
summary: A cookbook whose service calls an API with a vaulted key
category: test
runtime: python
deploy:
  kind: upload_and_run
source:
  include: ["app.py"]
  setup_command: "true"
vm:
  memory_mb: 256
  vcpu_count: 1
run:
  workdir: "."
  start_command: "python3 app.py"
app:
  port: 8000
  healthcheck_path: /health
  readiness_timeout_seconds: 90
secrets: []
post_deploy_notes: []
vault:
  required: true
  hosts: ["api.cookbook.test"]
"""


def test_vault_setup_bootstraps_a_cookbooks_vault_once(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "instavm.yaml").write_text(VAULTED_COOKBOOK)
    # Its prompts: bootstrap a vault? create one named vaulted-vault? the key's value.
    done = cli.run("vault", "setup", str(tmp_path), stdin="y\ny\ncookbook-s3cret\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Vault setup complete." in done.stdout and "cookbook-s3cret" not in done.stdout + done.stderr
    vaults = cli.json("vault", "list")
    listed = vaults["vaults"] if isinstance(vaults, dict) else vaults
    (vault,) = [entry for entry in listed if entry["name"] == "vaulted-vault"]
    try:
        assert "api.cookbook.test" in cli.ok("vault", "service", "list", vault["id"])
        again = cli.ok("vault", "setup", str(tmp_path))  # the vault's binding is found this time
        assert "Already covered: 1 vault(s) bind all 1 declared host(s)" in again, again
    finally:
        cli.ok("vault", "delete", vault["id"], "--yes")
    WORKED.add("vault setup")


def read_until(stream: IO[bytes], marker: bytes) -> bytes:
    """What ``stream`` gives up to ``marker`` (the test's timeout bounds the wait)."""
    seen = b""
    while marker not in seen:
        chunk = os.read(stream.fileno(), 4096)
        assert chunk, f"the CLI ended before {marker!r}: {seen!r}"
        seen += chunk
    return seen


def test_zz_count_of_working_commands(capsys: pytest.CaptureFixture[str]) -> None:
    missing = set(rows_of("works")) - WORKED
    with capsys.disabled():
        print(f"\nCLI contract: {len(WORKED)} of {len(ROWS)} CLI commands work against real VMs")
    assert not missing, f"works rows no test ran to the end: {sorted(missing)}"
    assert not set(rows_of("refused")) - REFUSALS_SEEN, "refused rows no test checked"
