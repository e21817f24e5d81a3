"""The keys the instavm SDK reads on routes Kiln serves (fake runtime): session
status, the account, API keys by id, staged environment variables, and the PTY
WebSocket's control frames. The real server and VMs: tests/e2e/test_sdk_contract.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from unit.fakes import FakeHypervisor
from unit.harness import AppRunner, key_headers

from kiln.api.routers.pty import _control_frame
from kiln.services.errors import InvalidRequest
from kiln.services.pty import LOGIN_SHELLS, shell_command
from kiln.services.staged_env import StagedEnv, check_entries


async def test_session_status_says_exists_assigned_and_alive(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        created = (await client.post("/v1/sessions/session", json={}, headers=auth)).json()
        sid = created["session_id"]
        status = (await client.get(f"/v1/sessions/status/{sid}", headers=auth)).json()
        assert status == {
            "session_id": sid,
            "vm_id": created["vm_id"],
            "vm_status": "active",
            "exists": True,
            "vm_assigned": True,
            "vm_alive": True,
        }
        await client.post("/kill", json={"session_id": sid}, headers=auth)
        ended = (await client.get(f"/v1/sessions/status/{sid}", headers=auth)).json()
        assert (ended["exists"], ended["vm_alive"], ended["vm_status"]) == (True, False, "terminated")


async def test_the_account_has_the_keys_the_cli_prints(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        me = (await client.get("/v1/users/me", headers=key_headers(admin_key()))).json()
        assert set(me) == {"id", "username", "email", "name", "is_verified", "created_at"}
        assert (me["name"], me["email"], me["is_verified"]) == ("admin", None, True)


async def test_an_api_key_is_read_and_renamed_by_id(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        made = (await client.post("/v1/api-keys/", json={"name": "ci"}, headers=auth)).json()
        got = (await client.get(f"/v1/api-keys/{made['id']}", headers=auth)).json()
        assert got["name"] == "ci" and "key" not in got
        renamed = await client.patch(f"/v1/api-keys/{made['id']}", json={"name": "deploy"}, headers=auth)
        assert renamed.status_code == 200 and renamed.json()["name"] == "deploy"
        assert (await client.get(f"/v1/api-keys/{made['id']}", headers=auth)).json()["name"] == "deploy"
        # The new name works: the key itself still authenticates.
        assert (await client.get("/v1/users/me", headers=key_headers(made["key"]))).status_code == 200

        unknown = await client.patch(f"/v1/api-keys/{made['id']}", json={"name": "x", "scopes": ["a"]}, headers=auth)
        assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "scopes"]
        empty = await client.patch(f"/v1/api-keys/{made['id']}", json={"name": ""}, headers=auth)
        assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "name"]
        assert (await client.get("/v1/api-keys/999999", headers=auth)).status_code == 404
        assert (await client.patch("/v1/api-keys/999999", json={"name": "x"}, headers=auth)).status_code == 404


def answer_pty_open(hypervisor: FakeHypervisor, vm_id: str) -> list[dict[str, Any]]:
    """Make the fake agent of ``vm_id`` answer ``pty_open`` as the real one does;
    returns the list its calls' arguments are collected in."""
    agent = hypervisor.machines[vm_id].fake_agent
    opened: list[dict[str, Any]] = []

    async def call(op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        if op != "pty_open":
            return {}
        opened.append(args)
        argv = ["/bin/bash", "-lc", args["command"]] if args["command"] else [args["shell"] or "/bin/bash"]
        info = {"pty_id": f"pty-{len(opened)}", "pid": 1, "argv": argv, "alive": True, "exit_code": None}
        return {**info, "cols": args["cols"], "rows": args["rows"], "created_at": 0}

    agent.call = call  # type: ignore[method-assign]
    return opened


async def test_staged_values_reach_the_next_terminal_only(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
        opens = answer_pty_open(hypervisor, vm_id)
        entries = [{"env_name": "TOKEN", "value": "s3cret"}, {"env_name": "B", "value": ""}]
        staged = await client.post(f"/v1/vms/{vm_id}/stage-env", json={"entries": entries}, headers=auth)
        assert staged.status_code == 200 and staged.json() == {"staged": ["B", "TOKEN"]}
        await client.post(f"/v1/vms/{vm_id}/pty/sessions", json={"env": {"B": "mine"}}, headers=auth)
        await client.post(f"/v1/vms/{vm_id}/pty/sessions", json={}, headers=auth)
        # The request's own value wins; the second terminal gets nothing staged.
        assert [call["env"] for call in opens] == [{"TOKEN": "s3cret", "B": "mine"}, {}]
        # Never through set_env (which writes /etc/environment, kept in snapshots).
        assert not [args for op, args in hypervisor.machines[vm_id].fake_agent.calls if op == "set_env"]

        bad = await client.post(
            f"/v1/vms/{vm_id}/stage-env", json={"entries": [{"env_name": "1X", "value": "v"}]}, headers=auth
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "entries", 0, "env_name"]
        extra = await client.post(
            f"/v1/vms/{vm_id}/stage-env",
            json={"entries": [{"env_name": "A", "value": "v", "secret": True}]},
            headers=auth,
        )
        assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "entries", 0, "secret"]
        nothing = await client.post(f"/v1/vms/{vm_id}/stage-env", json={"entries": []}, headers=auth)
        assert nothing.status_code == 422
        gone = await client.post("/v1/vms/vm-nope/stage-env", json={"entries": entries}, headers=auth)
        assert gone.status_code == 404


async def test_a_shell_program_starts_as_a_login_shell(
    run_app: AppRunner, admin_key: Callable[[], str], hypervisor: FakeHypervisor
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
        opens = answer_pty_open(hypervisor, vm_id)
        for shell in ("/bin/bash", "zsh", "/opt/tool"):
            await client.post(f"/v1/vms/{vm_id}/pty/sessions", json={"shell": shell}, headers=auth)
        assert [(call["command"], call["shell"]) for call in opens] == [
            ("exec /bin/bash -i -l", None),
            ("exec zsh -i -l", None),
            (None, "/opt/tool"),  # not a shell we know the flags of: exec'd as given
        ]
    assert "bash" in LOGIN_SHELLS and shell_command("/bin/my shell") == "exec '/bin/my shell' -i -l"


def test_staging_replaces_and_a_take_empties() -> None:
    staged = StagedEnv()
    staged.stage("vm-1", {"A": "1"})
    staged.stage("vm-1", {"B": "2"})
    assert staged.take("vm-2") == {}
    assert staged.take("vm-1") == {"B": "2"}
    assert staged.take("vm-1") == {}


@pytest.mark.parametrize(
    ("entries", "loc"),
    [
        ([("A=B", "v")], ("entries", 0, "env_name")),
        ([("OK", "v"), ("", "v")], ("entries", 1, "env_name")),
        ([("A", "a\0b")], ("entries", 0, "value")),
        ([("A", "x" * (64 * 1024 + 1))], ("entries", 0, "value")),
        ([(f"V{i}", "v") for i in range(65)], ("entries",)),
    ],
)
def test_entries_that_cannot_be_an_environment_are_refused_by_name(
    entries: list[tuple[str, str]], loc: tuple[object, ...]
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_entries(entries)
    assert refused.value.problems[0].loc == loc


@pytest.mark.parametrize(
    ("text", "control"),
    [
        ('{"type": "resize", "cols": 100, "rows": 30}', {"type": "resize", "cols": 100, "rows": 30}),
        ('  {"type": "ping"}', {"type": "ping"}),
        ("ls -l\n", None),
        ('{"no": "type"}', None),  # JSON, but no control frame: typed as it is
        ("{not json", None),
        ("[1, 2]", None),
    ],
)
def test_only_json_objects_with_a_type_are_control_frames(text: str, control: dict | None) -> None:
    assert _control_frame(text) == control


async def test_a_vm_update_refuses_what_it_would_not_do_by_name(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm_id = (await client.post("/v1/vms", json={}, headers=auth)).json()["vm_id"]
        memory = await client.patch(f"/v1/vms/{vm_id}", json={"memory_mb": 1024}, headers=auth)
        assert memory.status_code == 422
        assert memory.json()["detail"][0]["loc"] == ["body", "memory_mb"]
        assert "memory is not supported" in memory.json()["detail"][0]["msg"]
        unknown = await client.patch(f"/v1/vms/{vm_id}", json={"cpu_boost": True}, headers=auth)
        assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "cpu_boost"]
        # What it does do still works, and the refused change left the VM alone.
        kept = await client.patch(f"/v1/vms/{vm_id}", json={"metadata": {"a": "b"}}, headers=auth)
        assert kept.status_code == 200 and kept.json()["memory_mb"] != 1024
