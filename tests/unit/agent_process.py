"""Starting the guest agent on this host the way a guest starts it, and talking to it.

A guest runs ``python3 -S -m agent`` with /opt/kiln (the agent package and
protocol.py beside it) as its only path entry; here kiln/guest plays /opt/kiln.
So the tests also prove the agent imports nothing outside the standard library
and its own directory.

The system ops (net_config, mount, ...) change the machine they run on. On this
host the agent runs them only inside namespaces of its own (``unshare``), with
its paths (sysfs, /dev, /etc) pointed at scratch directories where a test needs
that; ``require`` skips such a test where the host cannot, and fails it under CI.
"""

from __future__ import annotations

import base64
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from kiln.guest import protocol
from kiln.runtime.agent_client import AgentClient

GUEST_DIR = Path(__file__).resolve().parents[2] / "kiln" / "guest"
AGENT_PACKAGE = GUEST_DIR / "agent"


def agent_command(*arguments: str) -> list[str]:
    return [sys.executable, "-S", "-m", "agent", *arguments]


def agent_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(GUEST_DIR)}


def start_socket_agent(socket_path: Path, workdir: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """The agent listening on ``socket_path`` (where the host's ``AgentClient``
    reaches it), with ``workdir`` as its workdir and etc dir; never touching the
    host's clock or hostname, never powering off (``--no-system``)."""
    arguments = ["--socket", str(socket_path), "--workdir", str(workdir), "--etc-dir", str(workdir), "--no-system"]
    return subprocess.Popen(agent_command(*arguments), env=agent_env(), **popen)


@asynccontextmanager
async def socket_agent(workdir: Path, ready_timeout: float = 10, **popen: Any) -> AsyncIterator[AgentClient]:
    """``start_socket_agent`` on ``workdir/agent.sock``, and a client of it once it
    answers; the client closed and the agent killed (and waited for) at the end."""
    process = start_socket_agent(workdir / "agent.sock", workdir, **popen)
    client = AgentClient(workdir / "agent.sock")
    try:
        await client.wait_ready(timeout=ready_timeout)
        yield client
    finally:
        await client.close()
        process.kill()
        process.wait()


def require(condition: bool, reason: str) -> None:
    """Skip the test when the host lacks what it needs; under CI, fail it."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and this host cannot run the test: {reason}")
    pytest.skip(reason)


def require_root_namespaces() -> None:
    require(os.geteuid() == 0, "needs root (network and mount namespaces)")
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")


def host_busybox() -> str:
    """A busybox for the agent's ip/mount/umount/sync: the one the image builds
    unpacked (what guests carry), else the host's (``make setup`` installs it)."""
    cache = Path(os.environ.get("KILN_CACHE_DIR", Path.home() / ".cache" / "kiln"))
    found = [str(path) for path in sorted(cache.glob("downloads/busybox-static*/bin/busybox"))]
    found += [path for path in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(path)]
    require(bool(found), "needs a busybox (busybox-static)")
    return found[0]


class AgentConnection:
    """A minimal multiplexing client: frames are routed to per-request queues by id."""

    process: subprocess.Popen[bytes]  # the agent's process
    etc: Path  # its --etc-dir, where a test gave it one

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.next_id = 0
        self.queues: dict[int, queue.Queue] = {}
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read_frames, daemon=True)
        self.reader.start()

    def _read_exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read_frames(self) -> None:
        try:
            while True:
                length = protocol.frame_length(self._read_exact(protocol.HEADER.size))
                frame = protocol.decode_body(self._read_exact(length))
                self.queues[frame["id"]].put(frame)
        except (EOFError, OSError):
            pass

    def start(self, op: str, **args: Any) -> int:
        with self.lock:
            self.next_id += 1
            request_id = self.next_id
            self.queues[request_id] = queue.Queue()
            self.sock.sendall(protocol.encode_frame({"id": request_id, "op": op, **args}))
        return request_id

    def wait(self, request_id: int, timeout: float = 30) -> tuple[list[dict], dict]:
        """(events, final frame) of one request."""
        events: list[dict] = []
        while True:
            frame = self.queues[request_id].get(timeout=timeout)
            if frame["kind"] in protocol.FINAL_KINDS:
                return events, frame
            events.append(frame)

    def call(self, op: str, **args: Any) -> dict:
        _, final = self.wait(self.start(op, **args))
        assert final["kind"] == "result", final
        return final["value"]

    def error(self, op: str, **args: Any) -> str:
        _, final = self.wait(self.start(op, **args))
        assert final["kind"] == "error", final
        return final["error"]

    def run(self, op: str = "exec", **args: Any) -> tuple[bytes, bytes, dict]:
        events, final = self.wait(self.start(op, **args))
        assert final["kind"] == "result", final
        out = b"".join(base64.b64decode(e["data"]) for e in events if e["kind"] == "stdout")
        err = b"".join(base64.b64decode(e["data"]) for e in events if e["kind"] == "stderr")
        return out, err, final["value"]


@contextmanager
def running_agent(*arguments: str, prefix: tuple[str, ...] = ()) -> Iterator[AgentConnection]:
    """The agent over a socketpair, started as ``prefix + python -S -m agent --fd N
    --no-system + arguments``; stopped (and waited for) at the end."""
    host_end, guest_end = socket.socketpair()
    process = subprocess.Popen(
        [*prefix, *agent_command("--fd", str(guest_end.fileno()), "--no-system", *arguments)],
        pass_fds=(guest_end.fileno(),),
        env=agent_env(),
    )
    guest_end.close()
    connection = AgentConnection(host_end)
    connection.process = process
    try:
        yield connection
    finally:
        host_end.shutdown(socket.SHUT_RDWR)
        host_end.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
