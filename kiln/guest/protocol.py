"""The agent wire protocol, shared by the guest agent and the host client.

Stdlib only: this module is copied into every guest image next to the agent
package (``/opt/kiln/protocol.py`` beside ``/opt/kiln/agent/``).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
Many requests share one channel at once; each carries an integer ``id`` and every
frame the agent sends back names the ``id`` it belongs to.

Host -> guest, a request::

    {"id": 7, "op": "exec", ...op arguments...}

Guest -> host, zero or more events, then exactly one final frame::

    {"id": 7, "kind": "stdout", "data": "<base64>"}      # event (exec output)
    {"id": 7, "kind": "stderr", "data": "<base64>"}      # event (exec output)
    {"id": 7, "kind": "result", "value": {...}}          # final: success
    {"id": 7, "kind": "error", "error": "ENOENT", "message": "..."}   # final: failure

Binary payloads (file contents, process output) are base64 in a ``data`` field.
"""

from __future__ import annotations

import json
import struct

AGENT_PORT_NAME = "kiln.agent"
# Inside the guest, udev-less: /dev/vport*p* is found by its sysfs name.
GUEST_PORT_PATH = "/dev/virtio-ports/" + AGENT_PORT_NAME

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 16 * 1024 * 1024
# File transfers and output chunks are cut to this size (before base64).
CHUNK_BYTES = 256 * 1024

# Kinds of frames the guest sends.
KIND_RESULT = "result"
KIND_ERROR = "error"
KIND_STDOUT = "stdout"
KIND_STDERR = "stderr"
FINAL_KINDS = (KIND_RESULT, KIND_ERROR)

# Operations the agent implements; the docstring of each handler (``op_*`` in
# the agent package) documents its arguments and result.
OPS = (
    "ping",
    "exec",
    "write_file",
    "read_file",
    "stat",
    "list",
    "set_env",
    "post_restore",
    "set_clock",
    "python_exec",
    "shutdown",
    "pty_open",
    "pty_attach",
    "pty_detach",
    "pty_write",
    "pty_resize",
    "pty_kill",
    "pty_list",
    "net_config",
    "mount",
    "umount",
    "fsfreeze",
    "fsthaw",
    "disk_usage",
    "trust_ca",
    "stream_write",
    "stream_ack",
    "stream_close",
    "tcp_connect",
    "list_dir",
    "remove",
    "mkdir",
    "rmdir",
    "rename",
    "set_attrs",
    "readlink",
    "symlink",
    "realpath",
)


class FrameError(ValueError):
    """A frame that is too large or not a JSON object."""


def encode_frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


def decode_body(body: bytes) -> dict:
    message = json.loads(body.decode("utf-8"))
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    return message


class FrameDecoder:
    """Splits a byte stream into frame bodies, recovering from a torn frame.

    A peer that goes away mid-frame (a host that disconnects and reconnects
    faster than the guest notices, a guest that was writing when the host left)
    leaves a partial frame in front of the next whole one. Recovery needs no
    change to the format: a header (length < 16 MiB) always begins with a zero
    byte and its body with ``{``, while a JSON body never holds a raw zero byte
    (JSON escapes control characters). So a zero byte inside a body marks a torn
    frame, and the stream resumes at the next zero byte that starts a header.

    Receivers should also ignore frames whose ``id`` they do not know: a reply to
    a request sent over an earlier connection may still arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._checked = HEADER.size  # body bytes before this are known zero-free
        self.discarded = 0  # bytes skipped while resynchronising, for logs

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; returns the bodies of the frames now complete.

        Linear in the bytes fed, whatever they hold: a peer sending garbage
        costs one scan of it (the buffer is cut once per call, not per skip)."""
        self._buffer += data
        buffer = self._buffer
        bodies = []
        start = 0
        while len(buffer) - start > HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            if buffer[start] != 0 or buffer[start + HEADER.size] != ord("{") or not 0 < length <= MAX_FRAME_BYTES:
                start = self._next_header(start)
                continue
            end = start + HEADER.size + length
            available = min(end, len(buffer))
            if buffer.find(0, start + self._checked, available) != -1:
                start = self._next_header(start)
                continue
            if len(buffer) < end:
                self._checked = available - start
                break
            bodies.append(bytes(buffer[start + HEADER.size : end]))
            start = end
            self._checked = HEADER.size
        del buffer[:start]
        return bodies

    def _next_header(self, start: int) -> int:
        """Where the next possible header after ``start`` begins (a zero byte)."""
        next_zero = self._buffer.find(0, start + 1)
        resumed = len(self._buffer) if next_zero == -1 else next_zero
        self.discarded += resumed - start
        self._checked = HEADER.size
        return resumed
