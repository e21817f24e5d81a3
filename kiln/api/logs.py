"""The server's log: one handler on the root logger, with secrets redacted.

``kiln serve`` logs at ``KILN_LOG_LEVEL`` through ``configure``: every logger
(Kiln's, uvicorn's access and error logs, the WebSocket library's, which at
debug level prints request lines and headers) ends in one stderr handler whose
formatter passes each finished line, traceback included, through ``redact``.

What is redacted wherever it appears: API keys (``kiln_`` and what follows),
JWTs (bearer tokens), the values of credential parameters in query strings and
forms (``api_key=``, ``token=``, ``password=`` ...), and the values of credential
headers (``Authorization``, ``X-API-Key``, ``Cookie``) as HTTP libraries print them.
Kiln itself never logs a credential; this is the net under third-party code
(uvicorn's access log prints the PTY WebSocket's ``?api_key=``).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

from kiln.api.request_ids import current_request_id

REDACTED = "<redacted>"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# (pattern, replacement); applied in order to every formatted line.
REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Credential headers, printed as "Name: value", "name=value" or Python reprs
    # like (b'x-api-key', b'value'); "Bearer"/"Basic" go with the value.
    (
        re.compile(
            r"(?i)\b(authorization|proxy-authorization|x-api-key|cookie|set-cookie)"
            r"(['\"]?\s*[:=,]\s*(?:b?['\"])?)(?:(?:bearer|basic)\s+)?[^\s'\"\)\],;]+"
        ),
        r"\1\2" + REDACTED,
    ),
    # Credentials in query strings and url-encoded forms.
    (
        re.compile(r"(?i)\b((?:api_key|apikey|access_token|token|password|secret)=)[^&\s'\"]+"),
        r"\1" + REDACTED,
    ),
    # API keys wherever they are (also mistyped or unknown ones).
    (re.compile(r"kiln_[A-Za-z0-9_\-]{8,}"), "kiln_" + REDACTED),
    # Webhook signing secrets (kiln.services.webhooks.signing).
    (re.compile(r"whsec_[A-Za-z0-9_\-]{8,}"), "whsec_" + REDACTED),
    # JWTs: three base64url parts, the first a JSON object ("eyJ" is '{"').
    (re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"), REDACTED),
)


def redact(text: str) -> str:
    for pattern, replacement in REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """A Formatter whose every output line has its secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """``KILN_LOG_FORMAT=json``: one JSON object per line (time, level, logger,
    message, request_id, exception), redacted as the text lines are."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "request_id": current_request_id.get(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str = "text") -> None:
    """Route every logger to one redacting stderr handler at ``level``; ``fmt`` is
    ``text`` (a line each) or ``json`` (an object each)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to the root instead of having handlers of theirs.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    logging.captureWarnings(True)
