"""``auth_config``: how a service's credential goes into a request.

Shapes accepted (the InstaVM SDK's; its CLI sends ``api-key`` for ``header``):

- ``{"type": "bearer", "token": "<credential name>"}``:
  ``Authorization: Bearer <value>``;
- ``{"type": "header" | "api-key", "header": "<name>", "key": "<credential name>",
  "prefix"?: "<text>"}``: ``<name>: <prefix><value>``.

The header is added, or replaces every header of that name the guest sent.
Other types the SDK knows (``url-path``, ``basic``, ``passthrough``) are refused
by name. Credential values must be valid header values: printable ASCII.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BEARER = "bearer"
HEADER_TYPES = ("header", "api-key")
SUPPORTED_TYPES = (BEARER, *HEADER_TYPES)
NOT_BUILT_TYPES = ("url-path", "basic", "passthrough")
# RFC 9110 token characters.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
# Headers that frame or route the message: replacing them would break it.
RESERVED_HEADERS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
        "keep-alive", "expect", "proxy-connection", "proxy-authorization", "proxy-authenticate",
    }
)  # fmt: skip
MAX_PREFIX_LENGTH = 64
MAX_VALUE_LENGTH = 8192


class AuthConfigError(ValueError):
    """``field`` of the auth_config is wrong; ``str()`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class AuthConfig:
    type: str  # as the client named it: bearer, header or api-key
    header: str  # the header's name as it is sent
    credential: str  # the name of the credential in the vault
    prefix: str = ""

    def to_wire(self) -> dict[str, Any]:
        if self.type == BEARER:
            return {"type": BEARER, "token": self.credential}
        wire: dict[str, Any] = {"type": self.type, "header": self.header, "key": self.credential}
        if self.prefix:
            wire["prefix"] = self.prefix
        return wire


def _text(raw: dict[str, Any], field: str) -> str:
    value = raw.get(field)
    if not isinstance(value, str) or not value.strip():
        raise AuthConfigError(field, f"auth_config.{field} must be a non-empty string")
    return value.strip()


def parse_auth_config(raw: object) -> AuthConfig:
    if not isinstance(raw, dict):
        raise AuthConfigError("type", "auth_config must be an object")
    kind = raw.get("type")
    if kind in NOT_BUILT_TYPES:
        raise AuthConfigError("type", f"auth_config type {kind!r} is not supported yet (supported: bearer, header)")
    if kind == BEARER:
        return AuthConfig(BEARER, "Authorization", _text(raw, "token"), "Bearer ")
    if kind in HEADER_TYPES:
        header = _text(raw, "header")
        if not _TOKEN.fullmatch(header):
            raise AuthConfigError("header", "auth_config.header must be a header name (letters, digits, '-', ...)")
        if header.lower() in RESERVED_HEADERS:
            raise AuthConfigError("header", f"auth_config.header {header!r} frames the request; it cannot carry a key")
        prefix = raw.get("prefix") or ""
        if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_LENGTH or not is_header_text(prefix, True):
            raise AuthConfigError(
                "prefix", f"auth_config.prefix must be at most {MAX_PREFIX_LENGTH} printable characters"
            )
        return AuthConfig(str(kind), header, _text(raw, "key"), prefix)
    raise AuthConfigError("type", "auth_config.type must be 'bearer' or 'header' (or 'api-key')")


def is_header_text(text: str, allow_empty: bool = False) -> bool:
    """Printable ASCII, no leading or trailing blank: safe as (part of) a header value."""
    if not text:
        return allow_empty
    return all(" " <= char <= "~" for char in text) and (allow_empty or text == text.strip())


def header_value(prefix: str, value: bytes) -> bytes:
    return prefix.encode("ascii") + value
