"""A build's ``disk_size_gb`` over HTTP: the sizes refused with a 422 naming it,
and a disk the host cannot hold refused by the disk budget; nothing is made."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from unit.harness import AppRunner, key_headers

from kiln.config import Settings
from kiln.services.snapshots.build_disk import GIB

LIMIT_GB = 1 << 20  # larger than any test host's disk


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_build_disk_gb": LIMIT_GB})


@pytest.fixture
def images_rootfs(tmp_path: Path) -> Path:
    """The fake image store's rootfs (``FakeImageStore``), its directory made."""
    path = tmp_path / "images" / "rootfs.ext4"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def nothing_made(client: httpx.AsyncClient, auth: dict[str, str]) -> bool:
    snapshots = (await client.get("/v1/snapshots", headers=auth)).json()
    vms = (await client.get("/v1/vms", headers=auth)).json()
    return snapshots == [] and vms == []


async def test_unusable_sizes_are_a_422_naming_disk_size_gb(
    run_app: AppRunner, admin_key: Callable[[], str], images_rootfs: Path
) -> None:
    with images_rootfs.open("wb") as rootfs:
        rootfs.truncate(int(1.5 * GIB))  # sparse: the image's disk is 1.5 GiB
    async with run_app() as client:
        auth = key_headers(admin_key())
        for size, message in (
            (1, "at least the image's disk (1.50 GiB)"),
            (0, f"between 1 and {LIMIT_GB} GiB (KILN_MAX_BUILD_DISK_GB)"),
            (-2, "between 1 and"),
            (LIMIT_GB + 1, "between 1 and"),
            (2.5, "whole number of GiB"),
            ("4", "whole number of GiB"),
            (True, "whole number of GiB"),
        ):
            body = {"oci_image": "default", "build_args": {"disk_size_gb": size}}
            response = await client.post("/v1/snapshots", json=body, headers=auth)
            assert response.status_code == 422, (size, response.text)
            [problem] = response.json()["detail"]
            assert problem["loc"] == ["body", "build_args", "disk_size_gb"], problem
            assert message in problem["msg"], (size, problem)
        assert await nothing_made(client, auth)


async def test_a_disk_the_host_cannot_hold_is_refused_by_the_budget(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    too_large = shutil.disk_usage(settings.data_dir).free // GIB + 2
    async with run_app() as client:
        auth = key_headers(admin_key())
        body = {"oci_image": "default", "build_args": {"disk_size_gb": too_large}}
        response = await client.post("/v1/snapshots", json=body, headers=auth)
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert detail.startswith(f"build_args.disk_size_gb={too_large}: not enough disk"), detail
        assert await nothing_made(client, auth)
