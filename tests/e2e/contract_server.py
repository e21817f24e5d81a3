"""The live server the contract tests share the pattern of: one ``kiln serve``
per test module, every VM deleted through the API at the end, and any VM
process left despite that destroyed from its run dir (then the test fails);
and the system snapshot a devbox template's publish finds on it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from devbox_manifest import template_snapshot_name
from live_server import LiveServer, serving

SMALL = {"memory_mb": 256, "vcpu_count": 1}  # the shape whose base snapshot is cached
# The SDK contract's webhook receiver listens on loopback.
SERVER_ENV = {"KILN_WEBHOOK_ALLOW_PRIVATE": "true"}
CONTRACT_TEMPLATE = "kiln-contract"  # the slug of the devbox template the contract publishes


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving("kiln-contract-", env=SERVER_ENV) as live:
        yield live


@pytest.fixture(scope="module")
def template_snapshot(server: LiveServer) -> Iterator[str]:
    """The operator's system snapshot that ``templates.publish`` of the
    ``CONTRACT_TEMPLATE`` manifest reuses (its own build would import
    docker.io/library/ubuntu:24.04, which a test does not pull): publish then
    gets past its snapshot step to devbox templates, which are refused."""
    body = {"image_variant": "default", "name": template_snapshot_name(CONTRACT_TEMPLATE), **SMALL}
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=600) as admin:
        published = admin.post("/v1/system-snapshots", json=body)
        assert published.status_code == 200 and published.json()["status"] == "ready", published.text
        yield published.json()["id"]
        admin.delete(f"/v1/system-snapshots/{published.json()['id']}")
