"""nftables transactions in JSON, through libnftables (the library the ``nft``
command and Debian's python3-nftables are built on).

Why not the ``nft`` command: the egress daemon adds a set element for every DNS
answer before the guest gets it, and a fork per answer costs milliseconds on a
busy host; the library runs the same JSON in-process. Why not python3-nftables:
it is a Debian package for the system Python, not installable into the
project's virtualenv; it is this same thin ctypes layer over libnftables.

A batch given to ``run`` is one netlink transaction: it applies whole or not at all.
The library applies it in the network namespace of the calling thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

# libnftables output flags (nftables.h)
_NFT_CTX_OUTPUT_HANDLE = 1 << 3
_NFT_CTX_OUTPUT_JSON = 1 << 4
LIBRARY_NAMES = ("libnftables.so.1", "libnftables.so")


class NftError(RuntimeError):
    """nftables refused a transaction (nothing of it was applied)."""


class NftUnavailable(NftError):
    """libnftables is not installed or cannot be loaded."""


def _load_library() -> ctypes.CDLL:
    names = [*LIBRARY_NAMES]
    found = ctypes.util.find_library("nftables")
    if found:
        names.append(found)
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as error:
            errors.append(str(error))
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        return lib
    raise NftUnavailable(f"libnftables cannot be loaded ({'; '.join(errors) or 'not found'})")


_library: ctypes.CDLL | None = None
_library_lock = threading.Lock()


def library() -> ctypes.CDLL:
    global _library
    with _library_lock:
        if _library is None:
            _library = _load_library()
        return _library


def run(commands: list[dict[str, Any]]) -> dict[str, Any]:
    """Run ``commands`` (JSON command objects: ``{"add": {...}}``, ...) as one
    transaction; returns the parsed output (``{"nftables": [...]}``, empty for
    commands that print nothing). Raises NftError with nft's message."""
    return _run_text(json.dumps({"nftables": commands}))


def list_ruleset_of(table_family: str, table: str) -> list[dict[str, Any]]:
    """The objects of one table (``nft -j list table``), or [] if it does not exist."""
    try:
        output = run([{"list": {"table": {"family": table_family, "name": table}}}])
    except NftError as error:
        if "No such file or directory" in str(error):
            return []
        raise
    return list(output.get("nftables", []))


def _run_text(text: str) -> dict[str, Any]:
    lib = library()
    # A context per call: contexts are not thread-safe, and one costs microseconds.
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NftError("nft_ctx_new failed")
    try:
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON | _NFT_CTX_OUTPUT_HANDLE)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        status = lib.nft_run_cmd_from_buffer(ctx, text.encode())
        output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)
    if status != 0:
        raise NftError(error.strip() or f"nftables transaction failed ({status})")
    if not output.strip():
        return {}
    result: dict[str, Any] = json.loads(output)
    return result
