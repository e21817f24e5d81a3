"""The live server the contract tests share the pattern of: one ``kiln serve``
per test module, every VM deleted through the API at the end, and any VM
process left despite that destroyed from its run dir (then the test fails)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from live_server import (
    LiveServer,
    destroy_leftover_vms,
    ensure_default_image,
    server_settings,
    short_data_dir,
    start_server,
    terminate_live_vms,
)

SMALL = {"memory_mb": 256, "vcpu_count": 1}  # the shape whose base snapshot is cached


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    data_dir = short_data_dir("kiln-contract-")
    settings = server_settings(data_dir)
    ensure_default_image(settings)
    # The SDK contract's webhook receiver listens on loopback.
    live = start_server(data_dir, env={"KILN_WEBHOOK_ALLOW_PRIVATE": "true"})
    try:
        yield live
    finally:
        try:
            terminate_live_vms(live.url, [live.admin_key])
        finally:
            live.stop()
            destroy_leftover_vms(settings)
            leftovers = list(settings.vms_dir.glob("*")) if settings.vms_dir.exists() else []
            shutil.rmtree(data_dir, ignore_errors=True)
            live.log_path.unlink(missing_ok=True)
            assert not leftovers, f"VM run dirs left behind: {leftovers}"
