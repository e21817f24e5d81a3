"""The SDK's OpenAI Agents integration (instavm.integrations.openai_agents) against
a real ``kiln serve`` with real VMs, driven as the agents runtime drives a
sandbox, without any model: create a session and start it, run commands, keep
its serialized state; the next run resumes from that state and starts again.

What it shows: the resumed session is the live one (same InstaVM session, same
VM, no VM created), because GET /v1/sessions/status/{id} answers ``exists``,
``vm_assigned`` and ``vm_alive`` as the integration reads them. Without them
it would start a new VM at every resume and lose the workspace.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from contract_server import SMALL, server
from instavm.integrations.openai_agents import InstaVMSandboxClient, InstaVMSandboxClientOptions
from live_server import LiveServer

pytestmark = pytest.mark.vm
__all__ = ["server"]  # the module's live server (a fixture)


def live_vms(http: httpx.Client) -> list[str]:
    return sorted(vm["vm_id"] for vm in http.get("/v1/vms").json())


def test_a_resumed_agent_sandbox_reuses_the_live_vm(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=120) as http:
        before = live_vms(http)
        sandbox = InstaVMSandboxClient(api_key=server.admin_key, base_url=server.url)
        options = InstaVMSandboxClientOptions(memory_mb=SMALL["memory_mb"], cpu_count=SMALL["vcpu_count"])

        async def first_run() -> tuple[str, str]:
            session = await sandbox.create(options=options)
            await session.start()
            wrote = await session.exec("echo kept-between-runs > note.txt && cat note.txt")
            assert wrote.ok(), wrote
            return session.state.model_dump_json(), wrote.stdout.decode()

        state_json, wrote = asyncio.run(first_run())
        assert wrote == "kept-between-runs\n"
        started = sorted(set(live_vms(http)) - set(before))
        assert len(started) == 1, started
        state = sandbox.deserialize_session_state(state_json)
        sid = state.instavm_session_id  # type: ignore[attr-defined]
        assert http.get(f"/v1/sessions/status/{sid}").json()["vm_id"] == started[0]

        async def next_run() -> tuple[str, str, bool]:
            session = await sandbox.resume(state)
            await session.start()
            read = await session.exec("cat note.txt")
            # Started again and used: still the one VM of the first run.
            assert sorted(set(live_vms(http)) - set(before)) == started
            resumed_sid = session.state.instavm_session_id  # type: ignore[attr-defined]
            running = await session.running()
            await sandbox.delete(session)  # what the runtime does when the sandbox is done
            return resumed_sid, read.stdout.decode(), running

        resumed_sid, read, running = asyncio.run(next_run())
        assert (resumed_sid, read, running) == (sid, "kept-between-runs\n", True)
        # No VM was made for the resume; the delete ended the one VM.
        assert live_vms(http) == before
        status = http.get(f"/v1/sessions/status/{sid}").json()
        assert (status["vm_id"], status["vm_alive"]) == (started[0], False)
