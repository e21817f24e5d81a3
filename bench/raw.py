"""The baselines: QEMU and the guest agent driven by hand, with no kiln code on
the hot path.

What is reused from kiln: ``kiln.runtime.qemu.build_argv`` (so the raw VM is the
same machine kiln runs: same devices, memory backend, accelerator flags) and the
saved state files of a base snapshot. Everything else here is its own minimal
code: a blocking QMP client (JSON lines on a unix socket), a blocking agent
client (4-byte big-endian length + JSON frames), ``qemu-img`` and ``Popen``.
Polls are tight (2 ms) because this is the floor kiln is measured against.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.qemu.cmdline import build_argv, tcg_kernel_arguments
from kiln.runtime.qemu.paths import RunPaths

POLL_SECONDS = 0.002
# A ping the guest has not answered by then is sent again (late answers are ignored).
PING_RESEND_SECONDS = 0.1
START_TIMEOUT_SECONDS = 120.0
FRAME_HEADER_BYTES = 4


class RawError(RuntimeError):
    pass


# ---- a minimal QMP client


class RawQmp:
    def __init__(self, path: Path, deadline: float) -> None:
        self._socket = _connect_unix(path, deadline)
        self._buffer = b""
        self._read_message()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, fds: tuple[int, ...] = (), /, **arguments: Any) -> object:
        """Run ``command``; ``fds`` go beside it (SCM_RIGHTS), as ``getfd`` takes them."""
        request: dict = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        socket.send_fds(self._socket, [json.dumps(request).encode() + b"\n"], list(fds))
        while True:
            message = self._read_message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise RawError(f"QMP {command}: {message['error']}")
            # Anything else is an asynchronous event: not ours to handle.

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.close()

    def _read_message(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = self._socket.recv(65536)
            if not chunk:
                raise RawError("QMP connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


# ---- a minimal agent client


class RawAgent:
    """One connection to the guest agent; one request at a time."""

    def __init__(self, path: Path, deadline: float) -> None:
        self._socket = _connect_unix(path, deadline)
        self._next_id = 1
        self._buffer = b""

    def send(self, op: str, **arguments: object) -> int:
        request_id = self._next_id
        self._next_id += 1
        body = json.dumps({"id": request_id, "op": op, **arguments}).encode()
        self._socket.settimeout(None)  # reads set a timeout; a send must not inherit it
        self._socket.sendall(len(body).to_bytes(FRAME_HEADER_BYTES, "big") + body)
        return request_id

    def wait_final(self, request_id: int, timeout: float) -> dict | None:
        """The final frame (result or error) of ``request_id``; None on timeout.
        Output events and frames of other (given-up) requests are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._read_frame(deadline)
            if frame is None:
                return None
            if frame.get("id") == request_id and frame.get("kind") in ("result", "error"):
                return frame

    def call(self, op: str, timeout: float = 30.0, **arguments: object) -> dict:
        frame = self.wait_final(self.send(op, **arguments), timeout)
        if frame is None:
            raise RawError(f"agent {op}: no answer within {timeout:g}s")
        if frame["kind"] == "error":
            raise RawError(f"agent {op}: {frame.get('error')}: {frame.get('message')}")
        return frame.get("value") or {}

    def wait_ready(self, timeout: float, resend_seconds: float = PING_RESEND_SECONDS) -> None:
        """Ping until the agent answers, resending often (a restored guest may
        drop the first bytes while it reconnects its port). Until the guest opens
        its port QEMU reads nothing, so a booting guest gets fewer pings."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            request_id = self.send("ping")
            if self.wait_final(request_id, resend_seconds) is not None:
                return
        raise RawError(f"the agent did not answer within {timeout:g}s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.close()

    def _read_frame(self, deadline: float) -> dict | None:
        while True:
            if len(self._buffer) >= FRAME_HEADER_BYTES:
                length = int.from_bytes(self._buffer[:FRAME_HEADER_BYTES], "big")
                end = FRAME_HEADER_BYTES + length
                if len(self._buffer) >= end:
                    body, self._buffer = self._buffer[FRAME_HEADER_BYTES:end], self._buffer[end:]
                    return json.loads(body)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._socket.settimeout(remaining)
            try:
                chunk = self._socket.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise RawError("the agent closed the connection")
            self._buffer += chunk


def _connect_unix(path: Path, deadline: float) -> socket.socket:
    """Connect, retrying while QEMU has not created the socket yet."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError as error:
            sock.close()
            if time.monotonic() > deadline:
                raise RawError(f"cannot connect to {path}: {error}") from error
            time.sleep(POLL_SECONDS)


# ---- VMs driven by hand


@dataclass
class RawVm:
    """A QEMU process started by the bench itself, and its agent connection."""

    run_dir: Path
    process: subprocess.Popen
    agent: RawAgent
    # Seconds spent in each step of the start, for the profile notes.
    steps: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        self.agent.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def saved_description(saved: SavedState) -> dict:
    return json.loads((saved.directory / "state.json").read_text())


def restore(
    saved: SavedState, image: BootImage, accel: str, run_dir: Path, *, hostname: str, identity: bool = True
) -> RawVm:
    """Restore ``saved`` into a new QEMU: overlay, spawn with ``-incoming
    defer``, load the state over QMP, wait for the agent, and with ``identity``
    reset its identity (as any restore must; without, the caller does it later,
    as a warm pool's claim does). ``steps`` says where the time went."""
    description = saved_description(saved)
    run_dir.mkdir(parents=True)
    paths = RunPaths(run_dir.resolve())
    spec = MachineSpec(
        vm_id=run_dir.name,
        vcpu_count=saved.vcpu_count,
        memory_mb=saved.memory_mb,
        image=image,
        run_dir=paths.root,
        restore_from=saved,
    )
    argv = build_argv(spec, accel, paths, tcg_arguments=tcg_kernel_arguments())
    steps: dict[str, float] = {}
    mark = time.monotonic()

    def step(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        steps[name] = now - mark
        mark = now

    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(saved.directory / "disk.qcow2"),
         "-u", str(paths.overlay), str(description["disk_size"])],
        check=True,
    )  # fmt: skip
    step("overlay")
    process = _spawn(argv, paths)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    qmp = None
    agent = None
    try:
        qmp = RawQmp(paths.qmp_socket, deadline)
        step("spawn_to_qmp")
        qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": saved.memory_file is not None}],
        )
        qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        # Through an fd, as kiln does: QEMU's seccomp sandbox (spawn=deny) rules out exec:.
        with (saved.directory / "vmstate").open("rb") as state:
            qmp.execute("getfd", (state.fileno(),), fdname="incoming")
        qmp.execute("migrate-incoming", uri="fd:incoming")
        while True:
            status = qmp.execute("query-status")["status"]  # type: ignore[index]
            if status == "running":
                break
            if status == "paused":  # saved while paused: QEMU keeps it so
                qmp.execute("cont")
                break
            if status not in ("inmigrate", "prelaunch") or time.monotonic() > deadline:
                raise RawError(f"loading the saved state ended with the VM {status}")
            time.sleep(POLL_SECONDS)
        step("load_state")
        agent = RawAgent(paths.agent_socket, deadline)
        agent.wait_ready(max(deadline - time.monotonic(), 1.0))
        step("agent_ready")
        if identity:
            reset_identity(agent, hostname)
            step("post_restore")
    except BaseException:
        if agent is not None:
            agent.close()
        _kill(process)
        raise
    finally:
        if qmp is not None:
            qmp.close()
    return RawVm(run_dir=paths.root, process=process, agent=agent, steps=steps)


def reset_identity(agent: RawAgent, hostname: str) -> None:
    agent.call(
        "post_restore",
        seed=base64.b64encode(os.urandom(64)).decode(),
        time_ns=time.time_ns(),
        hostname=hostname,
    )


def cold_boot(image: BootImage, accel: str, run_dir: Path, *, memory_mb: int, vcpu_count: int) -> RawVm:
    """Boot the image's kernel over a fresh overlay until the agent answers."""
    run_dir.mkdir(parents=True)
    paths = RunPaths(run_dir.resolve())
    spec = MachineSpec(
        vm_id=run_dir.name, vcpu_count=vcpu_count, memory_mb=memory_mb, image=image, run_dir=paths.root
    )
    argv = build_argv(spec, accel, paths, tcg_arguments=tcg_kernel_arguments())
    started = time.monotonic()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(Path(image.rootfs).resolve()),
         str(paths.overlay)],
        check=True,
    )  # fmt: skip
    process = _spawn(argv, paths)
    try:
        agent = RawAgent(paths.agent_socket, time.monotonic() + START_TIMEOUT_SECONDS)
        agent.wait_ready(START_TIMEOUT_SECONDS, resend_seconds=1.0)
    except BaseException:
        _kill(process)
        raise
    return RawVm(run_dir=paths.root, process=process, agent=agent, steps={"boot": time.monotonic() - started})


def _spawn(argv: list[str], paths: RunPaths) -> subprocess.Popen:
    with paths.qemu_log.open("wb") as qemu_log:
        # Its own session, like kiln's VMs: a Ctrl-C reaches the bench, which
        # then stops it, rather than QEMU dying half-way through a step.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
            cwd=paths.root,
            start_new_session=True,
        )


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
