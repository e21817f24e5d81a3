"""The SSH gateway through a real ``kiln serve``, to real VMs, with Debian's OpenSSH client.

One server (its gateway on a port of its own) and one VM serve the module;
the owner's key is registered through the API. In order: a command prints
the VM's hostname (by VM id and by session id) and VM records name the
gateway; exit statuses, stderr apart, stdin streamed; an interactive terminal
(pexpect) runs a command and sees a window resize; scp (legacy and SFTP mode)
and sftp round-trip a 20 MB binary file; -L reaches a server in the VM (a
closed port is refused); another user's key, a removed key and a wrong VM id
are refused alike; nothing is left in the guest after a client vanishes or
after ``kill -9`` of the gateway, which is started again with the same host
key; a suspended VM with ``auto_resume`` wakes on a login. At the end no VM,
no gateway process is left.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from live_api import SMALL, Api, live_server, process_exists, wait_until
from live_server import ssh_port
from unit.harness import add_user

from kiln.sshd.supervisor import SshGatewaySupervisor

pytestmark = pytest.mark.vm

TWENTY_MB = 20 * 1024 * 1024
GUEST_PORT = 8000


def keypair(directory: Path, name: str) -> Path:
    """A new Ed25519 key (OpenSSH's ssh-keygen); returns the private key's path."""
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path


class Ssh:
    """OpenSSH's clients pointed at the gateway, with a known_hosts file of their own."""

    def __init__(self, port: int, home: Path) -> None:
        self.port = port
        self.known_hosts = home / "known_hosts"

    def options(self, key: Path, strict: str = "accept-new", quiet: bool = True) -> list[str]:
        return [
            "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={strict}", "-o", f"UserKnownHostsFile={self.known_hosts}",
            *(["-o", "LogLevel=ERROR"] if quiet else []),
        ]  # fmt: skip

    def ssh_argv(self, key: Path, user: str, *command: str, strict: str = "accept-new") -> list[str]:
        return ["ssh", *self.options(key, strict), "-p", str(self.port), f"{user}@127.0.0.1", *command]

    def run(
        self, key: Path, user: str, *command: str, stdin: bytes = b"", strict: str = "accept-new"
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.ssh_argv(key, user, *command, strict=strict), input=stdin, capture_output=True, timeout=180
        )

    def scp(self, key: Path, *args: str, legacy: bool) -> subprocess.CompletedProcess[bytes]:
        mode = ["-O"] if legacy else ["-s"]
        argv = ["scp", *mode, *self.options(key), "-P", str(self.port), *args]
        return subprocess.run(argv, capture_output=True, timeout=300)

    def sftp(self, key: Path, user: str, batch: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["sftp", *self.options(key), "-P", str(self.port), "-b", "-", f"{user}@127.0.0.1"]
        return subprocess.run(argv, input=batch.encode(), capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    with live_server("kiln-ssh-") as live:
        yield live
        gateway_pid = SshGatewaySupervisor(live.settings).pid()
    assert gateway_pid is not None and wait_until(lambda: not process_exists(gateway_pid), 10), "the gateway was left"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ssh-home")


@pytest.fixture(scope="module")
def ssh(api: Api, home: Path) -> Ssh:
    return Ssh(ssh_port(api.server.data_dir), home)


@pytest.fixture(scope="module")
def key(api: Api, home: Path) -> Path:
    path = keypair(home, "owner")
    added = api.http.post("/v1/ssh-keys", json={"public_key": path.with_suffix(".pub").read_text()})
    assert added.status_code == 200, added.text
    return path


@pytest.fixture(scope="module")
def vm(api: Api) -> dict:
    return api.create_ok(**SMALL, vm_lifetime_seconds=1800)


def guest(api: Api, vm: dict, command: str) -> str:
    return api.run(vm["session_id"], command)


def test_a_command_prints_the_vms_hostname(api: Api, vm: dict, ssh: Ssh, key: Path) -> None:
    by_id = ssh.run(key, vm["vm_id"], "cat /etc/hostname")
    assert (by_id.returncode, by_id.stdout.decode().strip()) == (0, vm["vm_id"]), by_id.stderr
    by_session = ssh.run(key, vm["session_id"], "hostname")
    assert by_session.stdout.decode().strip() == vm["vm_id"], by_session.stderr
    record = api.vm(vm["vm_id"])
    assert (record["ssh_host"], record["ssh_port"]) == ("127.0.0.1", ssh.port)
    assert all(item["ssh_host"] == "127.0.0.1" for item in api.http.get("/v1/vms").json())


def test_exit_status_stderr_apart_and_stdin_streamed(vm: dict, ssh: Ssh, key: Path) -> None:
    failing = ssh.run(key, vm["vm_id"], "echo to-stdout; echo to-stderr >&2; exit 7")
    assert (failing.returncode, failing.stdout, failing.stderr) == (7, b"to-stdout\n", b"to-stderr\n")
    missing = ssh.run(key, vm["vm_id"], "no-such-command-here")
    assert missing.returncode == 127 and b"not found" in missing.stderr
    killed = ssh.run(key, vm["vm_id"], "kill -KILL $$")
    assert killed.returncode == 255  # OpenSSH's status for a remote command killed by a signal

    payload = os.urandom(5 * 1024 * 1024)
    echoed = ssh.run(key, vm["vm_id"], "cat", stdin=payload)
    assert echoed.returncode == 0 and echoed.stdout == payload
    summed = ssh.run(key, vm["vm_id"], "sha256sum", stdin=payload)
    assert summed.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    # The command reads while the client still writes, and answers as it goes.
    with subprocess.Popen(
        ssh.ssh_argv(key, vm["vm_id"], "while read line; do echo got $line; done"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    ) as both_ways:  # fmt: skip
        assert both_ways.stdin is not None and both_ways.stdout is not None
        both_ways.stdin.write(b"one\n")
        both_ways.stdin.flush()
        assert both_ways.stdout.readline() == b"got one\n"
        both_ways.stdin.write(b"two\n")
        both_ways.stdin.close()
        assert both_ways.stdout.read() == b"got two\n"
    assert both_ways.returncode == 0


def test_an_interactive_terminal_runs_a_command_and_sees_a_resize(vm: dict, ssh: Ssh, key: Path) -> None:
    argv = ssh.ssh_argv(key, vm["vm_id"])
    child = pexpect.spawn(argv[0], ["-tt", *argv[1:]], dimensions=(24, 80), timeout=60)
    try:
        child.expect(r"[#$] ")
        child.sendline("echo $TERM; stty size; echo answer-$((6*7))")
        child.expect("answer-42")
        assert b"24 80" in child.before
        child.setwinsize(40, 132)
        child.sendline("stty size")
        child.expect(r"40 132")
        # The shell's own SIGWINCH: a trap set (its answer seen) before the window changes.
        child.sendline("trap 'echo resized-$(stty size | tr \" \" x)' WINCH; echo trap-$((1+1)); sleep 5 & wait")
        child.expect("trap-2")
        child.setwinsize(30, 100)
        child.expect("resized-30x100")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3


@pytest.mark.parametrize("legacy", [True, False], ids=["scp-O", "scp-sftp-mode"])
def test_scp_round_trips_20_mb_byte_for_byte(vm: dict, ssh: Ssh, key: Path, tmp_path: Path, legacy: bool) -> None:
    original = tmp_path / "blob.bin"
    original.write_bytes(os.urandom(TWENTY_MB))
    remote = f"/tmp/scp-{legacy}.bin"
    up = ssh.scp(key, str(original), f"{vm['vm_id']}@127.0.0.1:{remote}", legacy=legacy)
    assert up.returncode == 0, up.stderr
    summed = ssh.run(key, vm["vm_id"], f"sha256sum {remote}")
    assert summed.stdout.split()[0].decode() == hashlib.sha256(original.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    down = ssh.scp(key, f"{vm['vm_id']}@127.0.0.1:{remote}", str(back), legacy=legacy)
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == original.read_bytes()
    missing = ssh.scp(key, f"{vm['vm_id']}@127.0.0.1:/tmp/none-such", str(tmp_path / "x"), legacy=legacy)
    assert missing.returncode != 0 and not (tmp_path / "x").exists()


def test_sftp_round_trips_20_mb_and_works_the_file_system(vm: dict, ssh: Ssh, key: Path, tmp_path: Path) -> None:
    original = tmp_path / "blob.bin"
    original.write_bytes(os.urandom(TWENTY_MB))
    back = tmp_path / "back.bin"
    batch = "\n".join([
        "cd /tmp", "mkdir sftp-dir", f"put {original} sftp-dir/blob.bin", "chmod 600 sftp-dir/blob.bin",
        "rename sftp-dir/blob.bin sftp-dir/moved.bin", "ls -l sftp-dir", f"get sftp-dir/moved.bin {back}",
        "symlink moved.bin sftp-dir/link", "ls -l sftp-dir", "pwd",
    ])  # fmt: skip
    session = ssh.sftp(key, vm["vm_id"], batch)
    assert session.returncode == 0, session.stderr
    listing = session.stdout.decode()
    lines = listing.splitlines()
    assert any(line.startswith("-rw-------") and line.endswith(" moved.bin") for line in lines), listing
    assert any(line.startswith("l") and line.endswith(" link") for line in lines), listing
    assert "Remote working directory: /tmp" in listing
    assert back.read_bytes() == original.read_bytes()
    assert ssh.run(key, vm["vm_id"], "readlink /tmp/sftp-dir/link").stdout == b"moved.bin\n"
    cleanup = ssh.sftp(key, vm["vm_id"], "rm /tmp/sftp-dir/link\nrm /tmp/sftp-dir/moved.bin\nrmdir /tmp/sftp-dir")
    assert cleanup.returncode == 0, cleanup.stderr
    assert ssh.run(key, vm["vm_id"], "test -e /tmp/sftp-dir").returncode == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_local_forwarding_reaches_a_server_in_the_vm(api: Api, vm: dict, ssh: Ssh, key: Path) -> None:
    # A server bound to the guest's loopback only: no guest network reaches it.
    guest(api, vm, "mkdir -p /tmp/www && head -c 3000000 /dev/urandom > /tmp/www/blob && sha256sum /tmp/www/blob")
    guest(api, vm, f"cd /tmp/www && (nohup python3 -m http.server {GUEST_PORT} --bind 127.0.0.1 >/dev/null 2>&1 &)")
    expected = guest(api, vm, "sha256sum /tmp/www/blob").split()[0]
    local, closed_local = _free_port(), _free_port()
    forward = ["-N", "-o", "ExitOnForwardFailure=yes"]
    with subprocess.Popen(
        ["ssh", *ssh.options(key, quiet=False), "-p", str(ssh.port), *forward, "-L", f"{local}:localhost:{GUEST_PORT}",
         "-L", f"{closed_local}:localhost:{GUEST_PORT + 1}", f"{vm['vm_id']}@127.0.0.1"],
        stderr=subprocess.PIPE,
    ) as tunnel:  # fmt: skip
        try:
            fetched = None
            deadline = time.monotonic() + 60
            while fetched is None and time.monotonic() < deadline:
                try:
                    fetched = httpx.get(f"http://127.0.0.1:{local}/blob", timeout=60)
                except httpx.TransportError:
                    time.sleep(0.2)  # the tunnel or the guest's server is not up yet
            assert fetched is not None and fetched.status_code == 200
            assert hashlib.sha256(fetched.content).hexdigest() == expected
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{closed_local}/", timeout=30)
        finally:
            tunnel.terminate()
            _, errors = tunnel.communicate(timeout=30)
    assert b"connect failed" in errors
    # Only the VM itself: a forward elsewhere is refused at once.
    elsewhere = subprocess.run(
        ["ssh", *ssh.options(key, quiet=False), "-p", str(ssh.port), "-W", "10.0.0.1:22", f"{vm['vm_id']}@127.0.0.1"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert elsewhere.returncode == 255 and b"administratively prohibited" in elsewhere.stderr


def test_another_users_key_a_removed_key_and_a_wrong_vm_are_refused_alike(
    api: Api, vm: dict, ssh: Ssh, key: Path, home: Path
) -> None:
    stranger_key = asyncio.run(add_user(api.settings, "stranger"))
    stranger = httpx.Client(base_url=api.server.url, headers={"X-API-Key": stranger_key}, timeout=60)
    theirs = keypair(home, "stranger")
    assert stranger.post("/v1/ssh-keys", json={"public_key": theirs.with_suffix(".pub").read_text()}).status_code == 200
    removed = keypair(home, "removed")
    added = api.http.post("/v1/ssh-keys", json={"public_key": removed.with_suffix(".pub").read_text()}).json()
    assert ssh.run(removed, vm["vm_id"], "true").returncode == 0
    assert api.http.delete(f"/v1/ssh-keys/{added['id']}").status_code == 200

    attempts = {
        "another user's key": ssh.run(theirs, vm["vm_id"], "true"),
        "a removed key": ssh.run(removed, vm["vm_id"], "true"),
        "a wrong vm id": ssh.run(key, "vm-0000000000000000", "true"),
        "a wrong session id": ssh.run(key, "no-such-session", "true"),
    }
    for what, attempt in attempts.items():
        assert attempt.returncode == 255, what
        assert attempt.stderr.decode().strip().endswith("Permission denied (publickey)."), (what, attempt.stderr)
    # Word for word the same, but for the username the client itself puts in front.
    assert len({attempt.stderr.split(b"@127.0.0.1", 1)[1] for attempt in attempts.values()}) == 1
    stranger.close()


def _guest_processes(api: Api, vm: dict, pattern: str) -> str:
    return guest(api, vm, f"ps -eo args | grep -F -- '{pattern}' | grep -v grep || true").strip()


def _live_terminals(api: Api, vm: dict) -> list[dict]:
    listed = api.http.get(f"/v1/vms/{vm['vm_id']}/pty/sessions")
    assert listed.status_code == 200, listed.text
    return [pty for pty in listed.json() if pty["alive"]]


def test_nothing_is_left_after_disconnects_and_kill_9_of_the_gateway(api: Api, vm: dict, ssh: Ssh, key: Path) -> None:
    terminals_before = len(_live_terminals(api, vm))
    # A client that vanishes: its command goes with it.
    vanishing = subprocess.Popen(ssh.ssh_argv(key, vm["vm_id"], "sleep 1001"), stdout=subprocess.PIPE)
    assert wait_until(lambda: _guest_processes(api, vm, "sleep 1001"), 60)
    vanishing.kill()
    vanishing.wait()
    assert wait_until(lambda: not _guest_processes(api, vm, "sleep 1001"), 60), "the command outlived its client"

    # A terminal and a command, then the gateway is killed under them.
    argv = ssh.ssh_argv(key, vm["vm_id"])
    shell = pexpect.spawn(argv[0], ["-tt", *argv[1:]], timeout=60)
    shell.expect(r"[#$] ")
    shell.sendline("sleep 1002")
    command = subprocess.Popen(ssh.ssh_argv(key, vm["vm_id"], "sleep 1003"), stdout=subprocess.PIPE)
    assert wait_until(lambda: _guest_processes(api, vm, "sleep 1002") and _guest_processes(api, vm, "sleep 1003"), 60)
    assert len(_live_terminals(api, vm)) == terminals_before + 1

    supervisor = SshGatewaySupervisor(api.settings)
    host_key = supervisor.host_key.read_bytes()
    old_pid = supervisor.pid()
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    shell.expect(pexpect.EOF)
    assert command.wait(timeout=60) == 255
    shell.close(force=True)
    assert wait_until(lambda: not _guest_processes(api, vm, "sleep 100"), 60), _guest_processes(api, vm, "sleep 100")
    assert len(_live_terminals(api, vm)) == terminals_before

    # The server starts it again, with the same host key: clients that know it still trust it.
    assert wait_until(lambda: supervisor.pid() not in (None, old_pid) and asyncio.run(supervisor.ping()), 60)
    assert supervisor.host_key.read_bytes() == host_key
    assert (supervisor.host_key.stat().st_mode & 0o777) == 0o600
    again = ssh.run(key, vm["vm_id"], "echo back", strict="yes")
    assert (again.returncode, again.stdout) == (0, b"back\n"), again.stderr


def test_a_suspended_vm_with_auto_resume_wakes_on_login(api: Api, ssh: Ssh, key: Path) -> None:
    sleeper = api.create_ok(**SMALL, vm_lifetime_seconds=600, auto_resume=True)
    suspended = api.http.post(f"/v1/vms/{sleeper['vm_id']}/suspend")
    assert suspended.status_code == 200 and suspended.json()["status"] == "suspended", suspended.text
    woken = ssh.run(key, sleeper["vm_id"], "cat /etc/hostname")
    assert (woken.returncode, woken.stdout.decode().strip()) == (0, sleeper["vm_id"]), woken.stderr
    assert api.vm(sleeper["vm_id"])["status"] == "running"

    # Without auto_resume the owner is told, and nothing wakes.
    assert api.http.patch(f"/v1/vms/{sleeper['vm_id']}", json={"auto_resume": False}).status_code == 200
    assert api.http.post(f"/v1/vms/{sleeper['vm_id']}/suspend").json()["status"] == "suspended"
    asleep = ssh.run(key, sleeper["vm_id"], "true")
    assert asleep.returncode == 255 and b"suspended" in asleep.stderr
    assert api.vm(sleeper["vm_id"])["status"] == "suspended"
    assert api.delete(sleeper["vm_id"]).status_code == 200
