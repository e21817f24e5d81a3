"""Build (or reuse) each image variant and boot it with a plain QEMU command.

No kiln driver code is involved: this checks the image and the guest agent on
their own, over the agent's virtio-serial port exposed as a unix socket.
"""

from __future__ import annotations

import base64
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.config import Settings
from kiln.guest import protocol
from kiln.runtime.driver import BootImage
from kiln.runtime.images import ImageStore

pytestmark = pytest.mark.vm

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0


def host_cpu_khz() -> int:
    # TCG gives the guest no reference to calibrate its TSC against: tell it.
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


class AgentSocket:
    """A blocking, one-request-at-a-time client; enough for these checks."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        # Ids unique across connections: a reply to a request of an earlier
        # connection may still arrive and must not be taken for ours.
        self.next_id = random.randrange(1 << 40)

    def _read_exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError("agent connection closed")
            data += chunk
        return data

    def send(self, op: str, **args) -> int:
        self.next_id += 1
        self.sock.sendall(protocol.encode_frame({"id": self.next_id, "op": op, **args}))
        return self.next_id

    def receive(self, request_id: int) -> tuple[bytes, dict]:
        """(stdout + stderr bytes, final frame); frames of other ids are skipped."""
        output = b""
        while True:
            length = protocol.frame_length(self._read_exact(protocol.HEADER.size))
            frame = protocol.decode_body(self._read_exact(length))
            if frame["id"] != request_id:
                continue  # e.g. a request left behind by an earlier connection
            if frame["kind"] in protocol.FINAL_KINDS:
                return output, frame
            output += base64.b64decode(frame["data"])

    def call(self, op: str, **args) -> tuple[bytes, dict]:
        output, final = self.receive(self.send(op, **args))
        assert final["kind"] == "result", final
        return output, final["value"]

    def close(self) -> None:
        self.sock.close()


@dataclass
class BootedVm:
    process: subprocess.Popen
    agent_socket: Path
    console: Path
    seconds_to_ping: float
    workdir: str

    def connect(self) -> AgentSocket:
        return AgentSocket(self.agent_socket, timeout=60)


@pytest.fixture(scope="module")
def image_store() -> ImageStore:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    return ImageStore(Settings())


def built(store: ImageStore, variant: str) -> BootImage:
    return store.get(variant) if _fresh(store, variant) else store.build(variant)


def _fresh(store: ImageStore, variant: str) -> bool:
    row = next(row for row in store.describe() if row["variant"] == variant)
    return bool(row["built"]) and not row["stale"]


def boot(image: BootImage, workdir: str) -> Iterator[BootedVm]:
    run_dir = Path(tempfile.mkdtemp(prefix="kiln-img-"))
    overlay, console, agent_socket = run_dir / "disk.qcow2", run_dir / "console.log", run_dir / "agent.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs), str(overlay)],
                   check=True)
    command = [
        QEMU, "-M", "microvm,acpi=on", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "2",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} tsc_early_khz={host_cpu_khz()}",
        "-drive", f"id=root,file={overlay},format=qcow2,if=none",
        "-device", "virtio-blk-device,drive=root",
        "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=off",
        "-device", "virtio-serial-device",
        "-device", f"virtserialport,chardev=agent,name={protocol.AGENT_PORT_NAME}",
        "-serial", f"file:{console}",
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        agent = AgentSocket(agent_socket, timeout=BOOT_TIMEOUT)
        try:
            agent.call("ping")
        except (OSError, EOFError) as exc:
            log = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            pytest.fail(f"{image.variant}: no agent answer ({exc}); console:\n{log}")
        finally:
            agent.close()
        vm = BootedVm(process, agent_socket, console, time.monotonic() - started, workdir)
        print(f"\n{image.variant}: cold boot to a ping answer in {vm.seconds_to_ping:.2f} s")
        yield vm
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stderr.close()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module", params=["minimal", "default"])
def vm(request: pytest.FixtureRequest, image_store: ImageStore) -> Iterator[BootedVm]:
    variant = request.param
    workdir = image_store.manifest(variant).workdir
    yield from boot(built(image_store, variant), workdir)


def test_agent_answers_and_runs_commands(vm: BootedVm) -> None:
    agent = vm.connect()
    try:
        _, ping = agent.call("ping")
        assert ping["uptime"] > 0
        output, result = agent.call("exec", argv=["nproc"])
        assert output == b"2\n" and result["exit_code"] == 0
        output, _ = agent.call("exec", shell="grep MemTotal /proc/meminfo")
        assert output.startswith(b"MemTotal:")
        output, _ = agent.call("exec", shell="pwd; echo $LANG")
        assert output == f"{vm.workdir}\nC.UTF-8\n".encode()
        output, result = agent.call("exec", shell="sleep 5", timeout=0.5)
        assert result["timed_out"] is True
    finally:
        agent.close()


def test_files_env_and_python_sessions(vm: BootedVm) -> None:
    agent = vm.connect()
    try:
        _, written = agent.call("write_file", path="/tmp/kiln/hello.txt", data=base64.b64encode(b"hi").decode(),
                                mkdirs=True)
        assert written == {"size": 2}
        _, read = agent.call("read_file", path="/tmp/kiln/hello.txt")
        assert base64.b64decode(read["data"]) == b"hi"
        agent.call("set_env", env={"KILN_TEST": "a b \"c\""})
        output, _ = agent.call("exec", argv=["python3", "-c", "import os; print(os.environ['KILN_TEST'])"])
        assert output == b'a b "c"\n'
        agent.call("python_exec", session="s", code="import json\nvalue = json.dumps([1])")
        output, result = agent.call("python_exec", session="s", code="print(value)")
        assert output == b"[1]\n" and result["exit_code"] == 0
    finally:
        agent.close()


def test_post_restore_sets_identity_and_clock(vm: BootedVm) -> None:
    agent = vm.connect()
    try:
        future_ns = int((time.time() + 86400 * 365) * 1e9)
        seed = base64.b64encode(bytes(range(64))).decode()
        agent.call("post_restore", seed=seed, time_ns=future_ns, hostname="clone-7")
        output, _ = agent.call("exec", shell="hostname; cat /etc/hostname; date +%s")
        hostname, etc_hostname, seconds = output.decode().split()
        assert hostname == etc_hostname == "clone-7"
        assert abs(int(seconds) - future_ns / 1e9) < 60
    finally:
        agent.close()


@pytest.fixture(scope="module")
def minimal_vm(image_store: ImageStore) -> Iterator[BootedVm]:
    yield from boot(built(image_store, "minimal"), image_store.manifest("minimal").workdir)


def test_agent_survives_host_disconnects_then_powers_off(minimal_vm: BootedVm) -> None:
    # A request left in flight, then the host goes away.
    agent = minimal_vm.connect()
    agent.send("exec", shell="sleep 1; head -c 300000 /dev/zero")
    agent.close()
    # A half-sent frame, then the host goes away: the agent must not stay out of step.
    agent = minimal_vm.connect()
    frame = protocol.encode_frame({"id": 1, "op": "ping"})
    agent.sock.sendall(frame[:6])
    agent.close()
    # Quick reconnects, each one used.
    for _ in range(3):
        agent = minimal_vm.connect()
        assert agent.call("ping")[1]["pid"] > 1
        agent.close()
    time.sleep(2)  # the in-flight exec finishes while nobody is connected
    agent = minimal_vm.connect()
    try:
        output, result = agent.call("exec", shell="echo still here")
        assert output == b"still here\n"
        agent.call("shutdown")
    finally:
        agent.close()
    assert minimal_vm.process.wait(timeout=60) == 0, "shutdown did not power the VM off"
