"""Secrets never leave the server's log handler (kiln.api.logs)."""

from __future__ import annotations

import io
import logging

import pytest

from kiln.api import logs

KEY = "kiln_" + "A1b2C3d4-_" * 4 + "xyz"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXBhcnQ"


@pytest.mark.parametrize(
    "line",
    [
        f'127.0.0.1:5000 - "WebSocket /v1/sessions/s/pty/p/connect?api_key={KEY}" [accepted]',
        f'127.0.0.1:5000 - "GET /x?a=1&api_key={KEY}&b=2 HTTP/1.1" 200',
        f"< X-API-Key: {KEY}",
        f"< Authorization: Bearer {JWT}",
        "< authorization: Bearer not-a-jwt-but-secret",
        f"{{'headers': [(b'x-api-key', b'{KEY}'), (b'authorization', b'Bearer {JWT}')]}}",
        "username=carol&password=s3cret-pass&grant_type=password",
        f"token={JWT} and a bare key {KEY}.",
        "Cookie: session=abc123secret",
    ],
)
def test_secrets_are_redacted(line: str) -> None:
    redacted = logs.redact(line)
    for secret in (KEY, JWT, "not-a-jwt-but-secret", "s3cret-pass", "abc123secret"):
        assert secret not in redacted, redacted
    assert logs.REDACTED in redacted


def test_ordinary_lines_are_untouched() -> None:
    line = 'INFO kiln.services.vms: vm vm-1234 running (base snapshot key=default-9d7b, 512 MB)'
    assert logs.redact(line) == line


def test_the_handler_redacts_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.RedactingFormatter(logs.LOG_FORMAT))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("key %s in an argument", KEY)
        try:
            raise ValueError(f"a key in an exception: {KEY}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert KEY not in stream.getvalue()
    assert stream.getvalue().count("kiln_" + logs.REDACTED) == 2
