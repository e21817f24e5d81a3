"""The agent's streams (streamed exec, tcp_connect, credit) and the file-system
ops SFTP needs, driven through the real host client against the agent running
on this host as a guest runs it."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from unit.agent_process import b64, socket_agent

from kiln.runtime.agent_client import NO_DEADLINE, AgentClient
from kiln.runtime.errors import AgentError

CHUNK = 256 * 1024


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentClient]:
    async with socket_agent(tmp_path) as client:
        yield client


async def collect(frames: AsyncIterator[dict], agent: AgentClient, stream_id: str) -> tuple[bytes, bytes, dict]:
    """Output of a streamed request (acknowledged as it comes) and its result."""
    out, err = bytearray(), bytearray()
    async for frame in aiter(frames):
        if frame["kind"] in ("stdout", "stderr"):
            data = base64.b64decode(frame["data"])
            (out if frame["kind"] == "stdout" else err).extend(data)
            await agent.call("stream_ack", stream_id=stream_id, bytes=len(data))
        elif frame["kind"] == "result":
            return bytes(out), bytes(err), frame["value"]
    raise AssertionError("no result")


async def test_a_streamed_command_gets_its_stdin_as_it_comes_and_keeps_stderr_apart(agent: AgentClient) -> None:
    script = "cat; echo done >&2; exit 3"
    frames = agent.stream("exec", timeout=NO_DEADLINE, argv=["/bin/sh", "-c", script], stream_id="s1").__aiter__()
    assert (await frames.__anext__())["kind"] == "started"
    reader = asyncio.ensure_future(collect(frames, agent, "s1"))
    payload = os.urandom(3 * CHUNK + 17)
    for start in range(0, len(payload), 100_000):
        await agent.call("stream_write", stream_id="s1", data=b64(payload[start : start + 100_000]))
    await agent.call("stream_write", stream_id="s1", eof=True)
    out, err, result = await reader
    assert (out, err, result["exit_code"]) == (payload, b"done\n", 3)
    # The stream is gone with its command.
    with pytest.raises(AgentError) as gone:
        await agent.call("stream_write", stream_id="s1", data=b64(b"late"))
    assert gone.value.code == "ENOENT"


async def test_output_waits_for_the_hosts_credit(agent: AgentClient) -> None:
    total = 8 * 1024 * 1024
    window = 2 * CHUNK
    frames = agent.stream(
        "exec", timeout=NO_DEADLINE, argv=["head", "-c", str(total), "/dev/zero"], stream_id="s2", window=window
    ).__aiter__()
    assert (await frames.__anext__())["kind"] == "started"
    received = 0
    while received < window:
        frame = await frames.__anext__()
        received += len(base64.b64decode(frame["data"]))
    assert received == window
    # Nothing more comes until the host acknowledges what it has.
    following = asyncio.ensure_future(frames.__anext__())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(following), 1.0)
    await agent.call("stream_ack", stream_id="s2", bytes=received)
    received += len(base64.b64decode((await following)["data"]))
    out, _, result = await collect(frames, agent, "s2")
    assert (received + len(out), result["exit_code"], result["truncated"]) == (total, 0, False)


async def test_closing_a_stream_kills_its_command(agent: AgentClient) -> None:
    frames = agent.stream("exec", timeout=NO_DEADLINE, argv=["sleep", "300"], stream_id="s3").__aiter__()
    assert (await frames.__anext__())["kind"] == "started"
    reader = asyncio.ensure_future(collect(frames, agent, "s3"))
    assert (await agent.call("stream_close", stream_id="s3"))["closed"] is True
    _, _, result = await asyncio.wait_for(reader, 30)
    assert result["exit_code"] == -9
    assert (await agent.call("stream_close", stream_id="s3")) == {"closed": False}


class EchoServer:
    """A TCP server on this host's loopback that sends back what it gets, upper-cased."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data.upper())


async def test_tcp_connect_reaches_a_port_of_the_guest_both_ways(agent: AgentClient) -> None:
    server = EchoServer()
    try:
        frames = agent.stream("tcp_connect", timeout=NO_DEADLINE, stream_id="t1", port=server.port).__aiter__()
        assert (await frames.__anext__())["kind"] == "connected"
        payload = b"hello guest " * 50_000
        await agent.call("stream_write", stream_id="t1", data=b64(payload), eof=True)
        out, _, result = await collect(frames, agent, "t1")
        assert out == payload.upper() and result["bytes_in"] == len(payload)
    finally:
        server.listener.close()


async def test_tcp_connect_refuses_a_closed_port_and_other_hosts(agent: AgentClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(AgentError) as refused:
        await agent.call("tcp_connect", stream_id="t2", port=closed_port)
    assert refused.value.code == "ECONNREFUSED"
    with pytest.raises(AgentError) as elsewhere:
        await agent.call("tcp_connect", stream_id="t3", port=22, host="10.0.0.1")
    assert elsewhere.value.code == "EINVAL"


async def test_the_file_system_ops_of_sftp(agent: AgentClient, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    await agent.call("mkdir", path=str(root), mode=0o750)
    assert (root.stat().st_mode & 0o777) == 0o750
    for index in range(5):
        (root / f"f{index}").write_bytes(b"x" * index)
    await agent.call("symlink", target="f4", path=str(root / "link"))
    first = await agent.call("list_dir", path=str(root), offset=0, limit=3)
    rest = await agent.call("list_dir", path=str(root), offset=3, limit=3)
    names = [entry["name"] for entry in first["entries"] + rest["entries"]]
    assert names == ["f0", "f1", "f2", "f3", "f4", "link"] and (first["done"], rest["done"]) == (False, True)
    link = rest["entries"][-1]
    assert link["target"] == "f4" and (link["st_mode"] & 0o170000) == 0o120000
    assert (await agent.call("readlink", path=str(root / "link")))["target"] == "f4"
    assert (await agent.call("realpath", path=str(root / "link")))["path"] == str(root / "f4")
    assert (await agent.call("stat", path=str(root / "link"), follow=False))["is_link"] is True
    assert (await agent.call("stat", path=str(root / "link")))["size"] == 4

    with pytest.raises(AgentError) as exists:
        await agent.call("rename", old=str(root / "f1"), new=str(root / "f2"))
    assert exists.value.code == "EEXIST"
    await agent.call("rename", old=str(root / "f1"), new=str(root / "f2"), overwrite=True)
    assert (root / "f2").read_bytes() == b"x" and not (root / "f1").exists()

    attrs = await agent.call("set_attrs", path=str(root / "f3"), mode=0o600, atime=1000, mtime=2000, size=1)
    assert (attrs["st_mode"] & 0o777, attrs["mtime"], attrs["size"]) == (0o600, 2000, 1)

    with pytest.raises(AgentError) as is_dir:
        await agent.call("remove", path=str(root))
    assert is_dir.value.code == "EISDIR"
    with pytest.raises(AgentError) as not_empty:
        await agent.call("rmdir", path=str(root))
    assert not_empty.value.code == "ENOTEMPTY"
    for name in ("f0", "f2", "f3", "f4", "link"):
        await agent.call("remove", path=str(root / name))
    await agent.call("rmdir", path=str(root))
    assert not root.exists()
