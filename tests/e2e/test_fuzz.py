"""A bounded schemathesis fuzz of the whole API, generated from its own OpenAPI.

A real uvicorn server runs in a thread with the fake runtime (no VM boots), and
generous admission limits, so that any 5xx is a bug rather than a full host.
Every request carries a valid bearer token (in X-API-Key, the way the SDK sends
credentials), so the fuzz reaches past authentication; a token, unlike an API
key, cannot be revoked by a fuzzed DELETE /v1/api-keys/{id}.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis import DataGenerationMethod
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)
from unit.fakes import FakeHypervisor, FakeImageStore
from unit.harness import add_user

from kiln.api.app import create_app
from kiln.config import Settings

FUZZ_EXAMPLES_PER_OPERATION = 15
FUZZ_PASSWORD = "fuzz password"


def serve_in_thread(server: uvicorn.Server, sock: socket.socket) -> threading.Thread:
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return thread


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    kiln_settings = Settings(
        data_dir=root / "var",
        cache_dir=root / "cache",
        database_url=f"sqlite+aiosqlite:///{root / 'var' / 'kiln.db'}",
        max_vms=10**6,
        max_memory_mb=10**9,
        max_vcpus=10**6,
    )
    app = create_app(
        kiln_settings,
        hypervisor=FakeHypervisor(),
        images=FakeImageStore(root / "images", built=("default", "minimal")),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = serve_in_thread(server, sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    asyncio.run(add_user(kiln_settings, "fuzzer", FUZZ_PASSWORD))
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def fuzz_token(server_url: str) -> str:
    response = httpx.post(
        f"{server_url}/v1/auth/token", data={"username": "fuzzer", "password": FUZZ_PASSWORD}
    )
    response.raise_for_status()
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def api_schema(server_url: str) -> schemathesis.BaseSchema:
    # FastAPI publishes OpenAPI 3.1 (nullable fields are `anyOf` with `type: null`),
    # which schemathesis 3.x supports behind this switch.
    schemathesis.experimental.OPEN_API_3_1.enable()
    return schemathesis.from_uri(
        f"{server_url}/openapi.json",
        base_url=server_url,
        # Negative cases too: malformed input must be a 4xx, never a 5xx.
        data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative],
    )


schema = schemathesis.from_pytest_fixture("api_schema")


POSITIVE_CHECKS = (not_a_server_error, response_schema_conformance, content_type_conformance)
# Malformed requests may be refused by uvicorn itself (a plain-text 400) before the
# app sees them; what matters for them is that nothing answers 5xx.
NEGATIVE_CHECKS = (not_a_server_error,)


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES_PER_OPERATION,
    deadline=None,
    # Reproducible in CI: the same examples every run.
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_openapi(case: schemathesis.Case, fuzz_token: str) -> None:
    positive = case.data_generation_method == DataGenerationMethod.positive
    case.call_and_validate(
        headers={"X-API-Key": fuzz_token},
        checks=POSITIVE_CHECKS if positive else NEGATIVE_CHECKS,
    )
