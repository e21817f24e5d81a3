"""The ssh phase: the SSH gateway against the HTTP API, same run, same VM.

A key made with ssh-keygen is registered (``/v1/ssh-keys``) and one VM
created. ``ssh VM true`` (Debian's OpenSSH client, a new connection each time:
key exchange, login, the command, its exit status) is timed against
``POST /execute`` of ``true``; then a 50 MB file of random bytes goes in with
``scp -O`` (what ``instavm deploy`` uses) and with ``POST /upload``, and both
are checked (sha256 in the guest).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.stats import Figures

FILE_MB = 50
SSH_TIMEOUT_SECONDS = 600.0


def declare(figures: Figures) -> None:
    figures.declare("exec_true_ms", "ms", note="POST /execute of bash 'true' (an HTTP round trip to the guest)")
    figures.declare("ssh_true_ms", "ms", baseline="exec_true_ms",
                    note="`ssh VM true` with OpenSSH's client through the gateway: a new connection each time "
                    "(key exchange, public-key login, the command, its exit status)")
    figures.declare("upload_mb_s", "MB/s", note=f"POST /upload of a {FILE_MB} MB file of random bytes")
    figures.declare("scp_upload_mb_s", "MB/s", baseline="upload_mb_s",
                    note=f"scp -O (legacy protocol) of the same {FILE_MB} MB file through the gateway")


class Client:
    """OpenSSH's ssh and scp with the bench's key and a known_hosts file of its own."""

    def __init__(self, root: Path, port: int) -> None:
        self.port = port
        self.key = root / "bench_ed25519"
        self.known_hosts = root / "known_hosts"
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(self.key)],
                           check=True)  # fmt: skip

    @property
    def public_key(self) -> str:
        return self.key.with_suffix(".pub").read_text()

    def options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "LogLevel=ERROR"]  # fmt: skip

    def ssh(self, vm_id: str, command: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["ssh", *self.options(), "-p", str(self.port), f"{vm_id}@127.0.0.1", command]
        return subprocess.run(argv, capture_output=True, timeout=SSH_TIMEOUT_SECONDS)

    def scp(self, source: str, target: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["scp", "-O", *self.options(), "-P", str(self.port), source, target]
        return subprocess.run(argv, capture_output=True, timeout=SSH_TIMEOUT_SECONDS)


def measure(
    figures: Figures,
    client: httpx.Client,
    root: Path,
    ssh_port: int,
    create: Callable[[dict], dict],
    execute: Callable[[str, str], float],
    *,
    samples: int,
    transfers: int,
) -> str:
    """Fills the ssh figures; returns the VM's id (the caller deletes it)."""
    if shutil.which("ssh") is None or shutil.which("scp") is None:
        raise RuntimeError("OpenSSH's client is not installed (apt-get install openssh-client)")
    ssh = Client(root, ssh_port)
    added = client.post("/v1/ssh-keys", json={"public_key": ssh.public_key})
    if added.status_code not in (200, 409):
        raise RuntimeError(f"POST /v1/ssh-keys answered {added.status_code}: {added.text[:300]}")
    record = create({})
    vm_id, session_id = record["vm_id"], record["session_id"]
    first = ssh.ssh(vm_id, "true")  # warms the guest's bash and the client's known_hosts
    if first.returncode != 0:
        raise RuntimeError(f"ssh {vm_id} true exited {first.returncode}: {first.stderr.decode()[-500:]}")
    execute(session_id, "true")
    for _ in range(samples):
        started = time.monotonic()
        done = ssh.ssh(vm_id, "true")
        elapsed = (time.monotonic() - started) * 1000
        if done.returncode != 0:
            raise RuntimeError(f"ssh {vm_id} true exited {done.returncode}: {done.stderr.decode()[-500:]}")
        figures["ssh_true_ms"].add(elapsed)
        figures["exec_true_ms"].add(execute(session_id, "true"))

    blob = root / "blob.bin"
    data = os.urandom(FILE_MB * 1024 * 1024)
    blob.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    megabytes = len(data) / 1e6
    try:
        for index in range(transfers):
            remote = f"/tmp/bench-scp-{index}.bin"
            started = time.monotonic()
            copied = ssh.scp(str(blob), f"{vm_id}@127.0.0.1:{remote}")
            seconds = time.monotonic() - started
            if copied.returncode != 0:
                raise RuntimeError(f"scp exited {copied.returncode}: {copied.stderr.decode()[-500:]}")
            check_digest(ssh, vm_id, remote, digest)
            figures["scp_upload_mb_s"].add(megabytes / seconds)

            remote = f"/tmp/bench-upload-{index}.bin"
            started = time.monotonic()
            with blob.open("rb") as file:
                form = {"remote_path": remote, "session_id": session_id}
                uploaded = client.post("/upload", files={"file": ("blob.bin", file)}, data=form)
            seconds = time.monotonic() - started
            if uploaded.status_code != 200:
                raise RuntimeError(f"/upload answered {uploaded.status_code}: {uploaded.text[:300]}")
            check_digest(ssh, vm_id, remote, digest)
            figures["upload_mb_s"].add(megabytes / seconds)
            ssh.ssh(vm_id, "rm -f /tmp/bench-scp-*.bin /tmp/bench-upload-*.bin")
    finally:
        blob.unlink(missing_ok=True)
    return vm_id


def check_digest(ssh: Client, vm_id: str, remote: str, digest: str) -> None:
    summed = ssh.ssh(vm_id, f"sha256sum {remote}")
    if summed.returncode != 0 or summed.stdout.split()[:1] != [digest.encode()]:
        raise RuntimeError(f"{remote} in the guest is not the file sent: {summed.stdout[:100]!r}")
