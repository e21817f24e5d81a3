"""The agent wire protocol, shared by the guest agent and the host client.

Stdlib only: this module is copied into every guest image next to ``agent.py``.

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

# Operations the agent implements; the docstring of each handler in agent.py
# documents its arguments and result.
OPS = (
    "ping",
    "exec",
    "write_file",
    "read_file",
    "stat",
    "list",
    "set_env",
    "post_restore",
    "python_exec",
    "shutdown",
    "pty_open",
    "pty_attach",
    "pty_detach",
    "pty_write",
    "pty_resize",
    "pty_kill",
    "pty_list",
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
