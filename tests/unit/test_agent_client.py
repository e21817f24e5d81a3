"""AgentClient against the real guest agent (run on the host) and a scripted fake peer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from unit.agent_process import AGENT_PACKAGE, socket_agent, start_socket_agent

from kiln.guest import protocol
from kiln.runtime import agent_client
from kiln.runtime.agent_client import AgentClient
from kiln.runtime.errors import AgentError, AgentTimeout, AgentUnavailable


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="kiln-") as directory:
        yield Path(directory)


def start_host_agent(socket_path: Path, workdir: Path) -> subprocess.Popen:
    return start_socket_agent(socket_path, workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


@pytest.fixture
async def host_agent(short_tmp: Path) -> AsyncIterator[tuple[AgentClient, Path]]:
    assert AGENT_PACKAGE.is_dir(), "kiln/guest/agent/ is missing"
    async with socket_agent(short_tmp, 20, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as client:
        yield client, short_tmp


# ---- against the real agent


async def test_ping_answers_with_uptime_and_pid(host_agent: tuple[AgentClient, Path]) -> None:
    client, _ = host_agent
    value = await client.call("ping")
    assert value["pid"] > 0
    assert value["uptime"] > 0


async def test_exec_streams_output_then_result(host_agent: tuple[AgentClient, Path]) -> None:
    client, _ = host_agent
    frames = [
        frame
        async for frame in client.stream("exec", shell="echo out; echo err >&2; exit 3", timeout=10)
    ]
    output = {kind: b"" for kind in ("stdout", "stderr")}
    for frame in frames[:-1]:
        output[frame["kind"]] += base64.b64decode(frame["data"])
    assert output == {"stdout": b"out\n", "stderr": b"err\n"}
    assert frames[-1]["kind"] == "result"
    assert frames[-1]["value"]["exit_code"] == 3


async def test_guest_timeout_is_forwarded_and_reported(host_agent: tuple[AgentClient, Path]) -> None:
    client, _ = host_agent
    value = await client.call("exec", argv=["sleep", "30"], timeout=0.5)
    assert value["timed_out"] is True


async def test_many_concurrent_calls_share_one_connection(host_agent: tuple[AgentClient, Path]) -> None:
    client, _ = host_agent
    results = await asyncio.gather(
        *(client.call("exec", argv=["echo", str(number)], timeout=20) for number in range(40)),
        *(client.call("ping") for _ in range(40)),
    )
    assert all(value["exit_code"] == 0 for value in results[:40])
    assert all("pid" in value for value in results[40:])


async def test_slow_call_does_not_delay_a_fast_one(host_agent: tuple[AgentClient, Path]) -> None:
    client, _ = host_agent
    slow = asyncio.create_task(client.call("exec", argv=["sleep", "2"], timeout=10))
    await asyncio.wait_for(client.call("ping"), timeout=1.5)
    assert not slow.done()
    assert (await slow)["exit_code"] == 0


async def test_error_frame_raises_agent_error(host_agent: tuple[AgentClient, Path]) -> None:
    client, directory = host_agent
    with pytest.raises(AgentError) as raised:
        await client.call("read_file", path=str(directory / "missing"))
    assert raised.value.code == "ENOENT"


async def test_file_round_trip(host_agent: tuple[AgentClient, Path]) -> None:
    client, directory = host_agent
    payload = os.urandom(300_000)
    path = str(directory / "sub" / "blob")
    written = await client.call(
        "write_file", path=path, data=base64.b64encode(payload).decode(), mkdirs=True
    )
    assert written["size"] == len(payload)
    value = await client.call("read_file", path=path, offset=0, length=len(payload))
    assert base64.b64decode(value["data"]) == payload


async def test_reconnects_after_the_agent_restarts(short_tmp: Path) -> None:
    assert AGENT_PACKAGE.is_dir(), "kiln/guest/agent/ is missing"
    socket_path = short_tmp / "agent.sock"
    client = AgentClient(socket_path)
    first = start_host_agent(socket_path, short_tmp)
    try:
        first_pid = (await client.wait_ready(timeout=20))["pid"]
        pending = asyncio.create_task(client.call("exec", argv=["sleep", "30"], timeout=60))
        await asyncio.sleep(0.3)
        stop(first)
        with pytest.raises(AgentUnavailable):
            await pending
        second = start_host_agent(socket_path, short_tmp)
        try:
            second_pid = (await client.wait_ready(timeout=20))["pid"]
            assert second_pid != first_pid
            assert (await client.call("ping"))["pid"] == second_pid
        finally:
            stop(second)
    finally:
        await client.close()


# ---- framing edge cases, against a fake peer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake_peer(short_tmp: Path) -> AsyncIterator[Callable[[Handler], Awaitable[AgentClient]]]:
    servers: list[asyncio.base_events.Server] = []
    clients: list[AgentClient] = []

    async def serve(handler: Handler) -> AgentClient:
        socket_path = short_tmp / f"fake{len(servers)}.sock"
        servers.append(await asyncio.start_unix_server(handler, path=str(socket_path)))
        client = AgentClient(socket_path)
        clients.append(client)
        return client

    try:
        yield serve
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            server.close()


async def read_request(reader: asyncio.StreamReader) -> dict:
    header = await reader.readexactly(protocol.HEADER.size)
    return protocol.decode_body(await reader.readexactly(protocol.frame_length(header)))


async def test_frames_split_into_single_bytes_are_reassembled(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        frame = protocol.encode_frame({"id": request["id"], "kind": "result", "value": {"ok": 1}})
        for index in range(len(frame)):
            writer.write(frame[index : index + 1])
            await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    assert await client.call("ping", timeout=5) == {"ok": 1}


async def test_answers_out_of_order_reach_their_callers(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = [await read_request(reader) for _ in range(3)]
        frames = b"".join(
            protocol.encode_frame(
                {"id": request["id"], "kind": "result", "value": {"n": request["n"]}}
            )
            for request in reversed(requests)
        )
        writer.write(frames)  # several frames in one write
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    values = await asyncio.gather(*(client.call("echo", timeout=5, n=n) for n in range(3)))
    assert [value["n"] for value in values] == [0, 1, 2]


async def test_unknown_ids_are_ignored(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        writer.write(protocol.encode_frame({"id": 999_999, "kind": "result", "value": {}}))
        writer.write(protocol.encode_frame({"kind": "result", "value": {}}))
        writer.write(protocol.encode_frame({"id": request["id"], "kind": "result", "value": {"x": 1}}))
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    assert await client.call("ping", timeout=5) == {"x": 1}


async def test_peer_closing_fails_pending_calls(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    client = await fake_peer(handler)
    with pytest.raises(AgentUnavailable):
        await client.call("ping", timeout=5)
    assert not client.connected


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(protocol.HEADER.pack(protocol.MAX_FRAME_BYTES + 1), id="oversized-header"),
        pytest.param(protocol.HEADER.pack(3) + b"[1]", id="not-an-object"),
        pytest.param(protocol.encode_frame({"id": 1, "kind": "result"})[:9], id="torn-frame"),
    ],
)
async def test_garbage_before_a_frame_is_skipped(fake_peer, garbage: bytes) -> None:
    """What a guest left half-written for an earlier connection must not cost the next one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        writer.write(garbage)
        writer.write(protocol.encode_frame({"id": request["id"], "kind": "result", "value": {"ok": 1}}))
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    assert await client.call("ping", timeout=5) == {"ok": 1}


async def test_a_frame_that_is_not_an_object_drops_the_connection(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(protocol.HEADER.pack(4) + b"{}{}")
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    with pytest.raises(AgentUnavailable, match="unreadable"):
        await client.call("ping", timeout=5)


async def test_silent_peer_times_out_and_late_answer_is_dropped(fake_peer) -> None:
    answer_now = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_request(reader)
        await answer_now.wait()
        writer.write(protocol.encode_frame({"id": first["id"], "kind": "result", "value": {"late": 1}}))
        second = await read_request(reader)
        writer.write(protocol.encode_frame({"id": second["id"], "kind": "result", "value": {"on_time": 1}}))
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    with pytest.raises(AgentTimeout):
        await client.call("ping", timeout=0.2)
    answer_now.set()
    assert await client.call("ping", timeout=5) == {"on_time": 1}


async def test_error_frame_carries_code_and_message(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        writer.write(
            protocol.encode_frame(
                {"id": request["id"], "kind": "error", "error": "EACCES", "message": "no"}
            )
        )
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    with pytest.raises(AgentError) as raised:
        await client.call("read_file", timeout=5, path="/x")
    assert (raised.value.code, raised.value.message) == ("EACCES", "no")


async def test_no_socket_means_unavailable_with_the_path(short_tmp: Path) -> None:
    client = AgentClient(short_tmp / "nothing.sock")
    with pytest.raises(AgentUnavailable, match="nothing.sock"):
        await client.call("ping")


async def test_wait_ready_times_out_clearly(short_tmp: Path) -> None:
    client = AgentClient(short_tmp / "nothing.sock")
    with pytest.raises(AgentUnavailable, match="did not answer within 0.3s"):
        await client.wait_ready(timeout=0.3)


async def test_wait_ready_waits_for_a_socket_that_appears_late(fake_peer, short_tmp: Path) -> None:
    socket_path = short_tmp / "late.sock"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            writer.write(protocol.encode_frame({"id": request["id"], "kind": "result", "value": {"pid": 1}}))
            await writer.drain()

    async def serve_later() -> asyncio.base_events.Server:
        await asyncio.sleep(0.5)
        return await asyncio.start_unix_server(handler, path=str(socket_path))

    client = AgentClient(socket_path)
    later = asyncio.create_task(serve_later())
    try:
        assert await client.wait_ready(timeout=5) == {"pid": 1}
    finally:
        await client.close()
        (await later).close()


# ---- a hostile guest harms only its own requests


async def test_a_guest_sending_garbage_without_end_is_cut_off(fake_peer) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB of bytes that are no frames
                writer.write(os.urandom(64 * 1024))
                await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    with pytest.raises(AgentUnavailable):
        await client.call("ping", timeout=10)
    assert client.misbehaving is not None and "no frames" in client.misbehaving
    with pytest.raises(AgentUnavailable, match="broke the protocol"):
        await client.call("ping", timeout=5)  # not talked to again


async def test_a_guest_flooding_frames_nobody_asked_for_is_cut_off(fake_peer, monkeypatch) -> None:
    monkeypatch.setattr(agent_client, "MAX_STRAY_BYTES", 256 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        frame = protocol.encode_frame({"id": 12345, "kind": "stdout", "data": "x" * 60_000})
        with contextlib.suppress(ConnectionError):
            for _ in range(20):
                writer.write(frame)
                await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    with pytest.raises(AgentUnavailable):
        await client.call("ping", timeout=10)
    assert client.misbehaving is not None and "nobody asked for" in client.misbehaving


async def test_a_caller_that_falls_behind_loses_its_request_not_memory(fake_peer, monkeypatch) -> None:
    monkeypatch.setattr(agent_client, "MAX_QUEUED_BYTES", 256 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        for _ in range(20):
            writer.write(protocol.encode_frame({"id": request["id"], "kind": "stdout", "data": "x" * 60_000}))
        await writer.drain()
        pong = await read_request(reader)
        writer.write(protocol.encode_frame({"id": pong["id"], "kind": "result", "value": {"ok": 1}}))
        await writer.drain()
        await reader.read()

    client = await fake_peer(handler)
    stream = client.stream("exec", timeout=10, shell="yes")
    first = await stream.__anext__()  # takes one frame, then stops reading
    assert first["kind"] == "stdout"
    await asyncio.sleep(0.5)  # meanwhile the guest sends far more than the caller may leave unread
    with pytest.raises(AgentUnavailable, match="fell more than"):
        async for _ in stream:
            pass
    # Only that request failed: the connection serves the next call.
    assert await client.call("ping", timeout=5) == {"ok": 1}
    assert client.misbehaving is None
