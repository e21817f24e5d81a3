"""Request ids (X-Request-ID) and JSON log lines (KILN_LOG_FORMAT=json)."""

from __future__ import annotations

import io
import json
import logging
import re

from unit.harness import AppRunner

from kiln.api import logs
from kiln.api.request_ids import current_request_id


async def test_every_answer_carries_a_request_id(run_app: AppRunner) -> None:
    async with run_app() as client:
        made = (await client.get("/healthz")).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", made)
        assert (await client.get("/healthz")).headers["x-request-id"] != made
        kept = await client.get("/v1/vms", headers={"X-Request-ID": "client-trace.42"})
        assert kept.status_code == 401 and kept.headers["x-request-id"] == "client-trace.42"
        for unfit in ("has space", "x" * 65, "semi;colon"):
            answer = await client.get("/healthz", headers={"X-Request-ID": unfit})
            assert answer.headers["x-request-id"] != unfit


def test_json_lines_carry_the_request_id_and_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("kiln.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    token = current_request_id.set("req-1")
    try:
        logger.info("key %s secret %s", "kiln_" + "A" * 40, "whsec_" + "b" * 40)
    finally:
        current_request_id.reset(token)
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["request_id"]) == ("info", "kiln.test.json", "req-1")
    assert "AAAA" not in entry["message"] and "bbbb" not in entry["message"]
    assert entry["message"] == "key kiln_<redacted> secret whsec_<redacted>"
