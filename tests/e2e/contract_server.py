"""The live server the contract tests share the pattern of: one ``kiln serve``
per test module, every VM deleted through the API at the end, and any VM
process left despite that destroyed from its run dir (then the test fails)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import LiveServer, serving

SMALL = {"memory_mb": 256, "vcpu_count": 1}  # the shape whose base snapshot is cached


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    # The SDK contract's webhook receiver listens on loopback.
    with serving("kiln-contract-", env={"KILN_WEBHOOK_ALLOW_PRIVATE": "true"}) as live:
        yield live
