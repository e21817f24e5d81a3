"""Running commands in a real VM straight through its agent (no service, no API)."""

from __future__ import annotations

import base64

from kiln.runtime.qemu import QemuMachine


async def shell(machine: QemuMachine, command: str) -> str:
    """The stdout of ``command`` run by the guest's shell; asserts it exited 0."""
    output = b""
    async for frame in machine.agent.stream("exec", shell=command, timeout=30):
        if frame["kind"] == "stdout":
            output += base64.b64decode(frame["data"])
        elif frame["kind"] == "result":
            assert frame["value"]["exit_code"] == 0, frame
    return output.decode()
