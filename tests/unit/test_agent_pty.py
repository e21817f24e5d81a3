"""The agent's pseudo-terminal ops, driven through the real host client.

The agent runs on this host as a subprocess serving a unix socket (no VM):
what is tested is the ops' behaviour, and AgentClient streaming them.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from unit.agent_process import socket_agent

from kiln.runtime.agent_client import AgentClient
from kiln.runtime.errors import AgentError


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentClient]:
    async with socket_agent(tmp_path) as client:
        yield client


async def read_until(agent: AgentClient, pty_id: str, wanted: bytes, timeout: float = 10) -> bytes:
    """Attach, collect output until ``wanted`` shows up, detach."""
    seen = b""

    async def follow() -> None:
        nonlocal seen
        async for frame in agent.stream("pty_attach", pty_id=pty_id, attach_id="reader"):
            if frame["kind"] == "stdout":
                seen += base64.b64decode(frame["data"])
                if wanted in seen:
                    return

    try:
        await asyncio.wait_for(follow(), timeout)
    finally:
        await agent.call("pty_detach", pty_id=pty_id, attach_id="reader")
    return seen


async def test_a_shell_echoes_what_is_typed(agent: AgentClient) -> None:
    info = await agent.call("pty_open", cols=100, rows=30, shell="/bin/sh", pty_id="t1")
    assert info["pty_id"] == "t1" and info["alive"] and (info["cols"], info["rows"]) == (100, 30)
    await agent.call("pty_write", pty_id="t1", data=base64.b64encode(b"echo hi-$((40+2))\n").decode())
    assert b"hi-42" in await read_until(agent, "t1", b"hi-42")
    # The terminal size is what the shell sees; resizing changes it.
    await agent.call("pty_resize", pty_id="t1", cols=120, rows=40)
    await agent.call("pty_write", pty_id="t1", data=base64.b64encode(b"stty size\n").decode())
    assert b"40 120" in await read_until(agent, "t1", b"40 120")
    killed = await agent.call("pty_kill", pty_id="t1")
    assert not killed["alive"]
    assert (await agent.call("pty_list"))["ptys"] == []


async def test_a_command_runs_to_its_end_and_output_is_replayed(agent: AgentClient) -> None:
    await agent.call("pty_open", command="echo done-$((1+1)); exit 7", pty_id="cmd")
    deadline = time.monotonic() + 10
    while (await agent.call("pty_list"))["ptys"][0]["alive"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # Attaching after the end still shows what it printed, then the exit code.
    frames = [frame async for frame in agent.stream("pty_attach", pty_id="cmd", attach_id="a")]
    output = b"".join(base64.b64decode(f["data"]) for f in frames if f["kind"] == "stdout")
    assert b"done-2" in output
    assert frames[-1]["value"] == {"exit_code": 7, "detached": False}


async def test_detach_ends_an_attach_and_leaves_the_terminal(agent: AgentClient) -> None:
    await agent.call("pty_open", shell="/bin/sh", pty_id="keep")
    attach = asyncio.ensure_future(
        agent.call("pty_attach", pty_id="keep", attach_id="x", replay=False)
    )
    await asyncio.sleep(0.2)
    await agent.call("pty_detach", pty_id="keep", attach_id="x")
    assert (await asyncio.wait_for(attach, 5))["detached"] is True
    assert (await agent.call("pty_list"))["ptys"][0]["alive"]
    await agent.call("pty_kill", pty_id="keep")


async def test_bad_requests_are_errors(agent: AgentClient) -> None:
    with pytest.raises(AgentError) as missing:
        await agent.call("pty_write", pty_id="nope", data="")
    assert missing.value.code == "ENOENT"
    with pytest.raises(AgentError) as too_wide:
        await agent.call("pty_open", cols=5000)
    assert too_wide.value.code == "EINVAL"
    with pytest.raises(AgentError) as no_program:
        await agent.call("pty_open", shell="/does/not/exist")
    assert no_program.value.code == "ENOENT"
    await agent.call("pty_open", shell="/bin/sh", pty_id="dup")
    with pytest.raises(AgentError) as duplicate:
        await agent.call("pty_open", shell="/bin/sh", pty_id="dup")
    assert duplicate.value.code == "EEXIST"
    await agent.call("pty_kill", pty_id="dup")
