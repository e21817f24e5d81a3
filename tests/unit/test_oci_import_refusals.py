"""POST /v1/snapshots refuses every host path outside the operator's import roots
with one message, over HTTP against an in-process app (no VM boots: the request
is refused before an import starts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from unit.fakes import FakeImageStore
from unit.harness import AppRunner, key_headers
from unit.test_oci import TAR, make_layout, member, tar_bytes

from kiln.config import Settings
from kiln.services.oci_sources import LOCAL_REFUSED


class ImportingImageStore(FakeImageStore):
    """An image store that could build imports (they never get that far here)."""

    def guest_busybox(self, variant: str) -> Path:
        return self.root / "busybox"

    @property
    def init_dir(self) -> Path:
        return self.root / "init"


@pytest.fixture
def images(tmp_path: Path) -> FakeImageStore:
    return ImportingImageStore(tmp_path / "images")


@pytest.fixture
def import_root(tmp_path: Path) -> Path:
    root = tmp_path / "oci-root"
    root.mkdir()
    return root


@pytest.fixture
def settings(settings: Settings, import_root: Path) -> Settings:
    return settings.model_copy(update={"oci_import_roots": [import_root]})


async def test_host_paths_all_get_the_same_422(
    run_app: AppRunner, admin_key: Callable[[], str], import_root: Path, tmp_path: Path
) -> None:
    outside = make_layout(tmp_path / "outside", [(TAR, tar_bytes(member("f", data=b"x")))])
    (import_root / "link-out").symlink_to(outside)
    paths = ["/", "/etc", "~", "~/.ssh", "/no/such/path", str(outside), str(import_root / "link-out"),
             str(import_root / "missing"), f"{import_root}/../outside"]  # fmt: skip
    async with run_app() as client:
        auth = key_headers(admin_key())
        answers = [
            await client.post("/v1/snapshots", json={"oci_image": path}, headers=auth)
            for path in paths
        ]
        listed = (await client.get("/v1/snapshots?type=user", headers=auth)).json()
    assert [answer.status_code for answer in answers] == [422] * len(paths)
    bodies = {answer.text for answer in answers}
    assert len(bodies) == 1, bodies
    detail = answers[0].json()["detail"]
    assert detail == [{"loc": ["body", "oci_image"], "msg": LOCAL_REFUSED, "type": "value_error"}]
    assert listed == []


async def test_registry_references_need_the_operators_list(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        answer = await client.post(
            "/v1/snapshots", json={"oci_image": "docker.io/library/python:3.12"},
            headers=key_headers(admin_key()),
        )  # fmt: skip
    assert answer.status_code == 422
    assert "pulls from no registry" in answer.json()["detail"][0]["msg"]
