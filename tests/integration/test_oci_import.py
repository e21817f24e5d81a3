"""POST /v1/snapshots from an OCI image layout, end to end: the app in-process,
real QEMU, real database, a layout built here from a real Debian root tree."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import shutil
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_snapshots_api import Api, running_api

from kiln.config import Settings
from kiln.runtime.driver import SavedState
from kiln.runtime.images import ImageStore

pytestmark = pytest.mark.vm

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
IMAGE_ENV = "from the image config; with spaces & $dollars"


def add_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_file_blob(layout: Path, path: Path) -> dict:
    hasher = hashlib.sha256()
    with path.open("rb") as blob:
        while chunk := blob.read(1 << 20):
            hasher.update(chunk)
    size = path.stat().st_size
    path.rename(layout / "blobs" / "sha256" / hasher.hexdigest())
    return {"digest": f"sha256:{hasher.hexdigest()}", "size": size}


def small_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_layout(layout: Path, layers: list[tuple[str, dict]], config: dict) -> Path:
    """``layers``: (media type, descriptor of a blob already in the layout)."""
    config_blob = json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    }).encode()  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **add_blob(layout, config_blob)},
        "layers": [{"mediaType": media_type, **descriptor} for media_type, descriptor in layers],
    }
    manifest_descriptor = add_blob(layout, json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_descriptor,
        "platform": {"architecture": "amd64", "os": "linux"},
    }]}  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return layout


def new_layout(directory: Path) -> Path:
    (directory / "blobs" / "sha256").mkdir(parents=True)
    return directory


@pytest.fixture(scope="module")
def debian_layout(vm_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer 1: the `minimal` variant's Debian base tarball, gzipped. Layer 2: a
    new file and a whiteout of /etc/issue.net. Config: Env and WorkingDir."""
    store = ImageStore(vm_settings)
    manifest = store.manifest("minimal")
    base = store.base_dir / f"{manifest.suite}-{manifest.base_layer_key()[:16]}.tar"
    if not base.is_file():
        pytest.skip(f"no cached Debian base tarball at {base} (build the minimal variant once)")
    layout = new_layout(tmp_path_factory.mktemp("debian-oci"))
    started = time.monotonic()
    compressed = layout / "layer1.partial"
    with base.open("rb") as source, gzip.open(compressed, "wb", compresslevel=1) as target:
        shutil.copyfileobj(source, target, 1 << 20)
    layer1 = add_file_blob(layout, compressed)
    layer2 = add_blob(layout, small_tar({
        "opt/from-layer-2/hello.txt": b"hello from layer 2\n",
        "etc/.wh.issue.net": b"",
    }))  # fmt: skip
    write_layout(layout, [(LAYER_GZIP, layer1), (LAYER_TAR, layer2)], {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"KILN_OCI_TEST={IMAGE_ENV}"],
        "WorkingDir": "/srv/app",
    })  # fmt: skip
    print(f"\nlayout built in {time.monotonic() - started:.1f}s ({layer1['size'] / 1e6:.0f} MB layer 1)")
    return layout


@pytest.fixture
async def api(
    vm_settings: Settings, base_snapshot: SavedState, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    # Every layout these tests build is under pytest's temporary directory: the
    # operator's import root here. Docker Hub is allowed, and unreachable from CI.
    async with running_api(
        vm_settings, base_snapshot,
        oci_import_roots=[tmp_path_factory.getbasetemp()], oci_registries=["docker.io"],
    ) as started:  # fmt: skip
        yield started


def assert_nothing_left(api: Api) -> None:
    imports = api.settings.data_dir / "imports"
    assert not imports.exists() or list(imports.iterdir()) == []
    vms = api.settings.vms_dir
    assert not vms.exists() or not [p for p in vms.iterdir() if p.name.startswith("import-")]


async def test_an_oci_layout_becomes_a_snapshot_that_vms_start_from(
    api: Api, debian_layout: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kiln.services.snapshots")
    started = time.monotonic()
    response = await api.client.post(
        "/v1/snapshots", json={"oci_image": str(debian_layout), "name": "debian via oci"},
        params={"wait": True}, headers=api.auth, timeout=600,
    )  # fmt: skip
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    snapshot = response.json()
    assert (snapshot["status"], snapshot["type"], snapshot["name"]) == ("ready", "user", "debian via oci"), snapshot
    assert snapshot["size_bytes"] > 0 and snapshot["source_vm_id"] is None
    defaults = (api.settings.default_memory_mb, api.settings.default_vcpu_count)
    assert (snapshot["memory_mb"], snapshot["vcpu_count"]) == defaults
    timings = [r.getMessage() for r in caplog.records if "imported snapshot" in r.getMessage()]
    print(f"\nimport (POST to ready): {took:.1f}s; {timings}")
    assert_nothing_left(api)

    started = time.monotonic()
    vm = await api.create(snapshot_id=snapshot["id"])
    print(f"create from the imported snapshot to running: {time.monotonic() - started:.2f}s")
    assert vm["status"] == "running"
    vm_id = vm["vm_id"]
    assert (await api.shell(vm_id, "cat /opt/from-layer-2/hello.txt")) == "hello from layer 2\n"
    assert (await api.shell(vm_id, "test -e /etc/issue.net && echo present || echo gone")).strip() == "gone"
    assert (await api.shell(vm_id, "cat /etc/issue")).startswith("Debian GNU/Linux")
    assert (await api.shell(vm_id, 'printf "%s" "$KILN_OCI_TEST"')) == IMAGE_ENV
    assert (await api.shell(vm_id, "grep '^ID=' /etc/os-release")).strip() == "ID=debian"
    assert (await api.shell(vm_id, "pwd")).strip() == "/srv/app"
    assert (await api.python(vm_id, "import os; print(os.environ['KILN_OCI_TEST'])")).strip() == IMAGE_ENV
    assert (await api.shell(vm_id, "hostname")).strip() == vm_id

    # Only its owner sees it; it cannot go while a VM runs on it; then it can, with its files.
    assert (await api.client.get(f"/v1/snapshots/{snapshot['id']}", headers=api.other_auth)).status_code == 404
    assert (await api.client.delete(f"/v1/snapshots/{snapshot['id']}", headers=api.auth)).status_code == 409
    assert (await api.client.delete(f"/v1/vms/{vm_id}", headers=api.auth)).status_code == 200
    deleted = await api.client.delete(f"/v1/snapshots/{snapshot['id']}", headers=api.auth)
    assert deleted.status_code == 200, deleted.text
    assert not (api.settings.snapshots_dir / snapshot["id"]).exists()


async def test_what_is_not_an_oci_layout_is_a_422_on_oci_image(api: Api, tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing"):
        response = await api.client.post("/v1/snapshots", json={"oci_image": str(path)}, headers=api.auth)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "oci_image"]
    listed = await api.client.get("/v1/snapshots?type=user", headers=api.auth)
    assert listed.json() == []


async def test_an_image_without_python3_is_refused(api: Api, tmp_path: Path) -> None:
    layout = new_layout(tmp_path / "layout")
    layer = add_blob(layout, small_tar({"etc/os-release": b"ID=nothing\n", "bin/true": b""}))
    write_layout(layout, [(LAYER_TAR, layer)], {})
    response = await api.client.post(
        "/v1/snapshots", json={"oci_image": str(layout)}, params={"wait": True}, headers=api.auth
    )
    assert response.status_code == 422, response.text
    assert "the image has no python3" in response.json()["detail"][0]["msg"]
    assert (await api.client.get("/v1/snapshots?type=user", headers=api.auth)).json() == []
    assert_nothing_left(api)


async def test_a_layer_digest_mismatch_fails_with_the_reason(api: Api, tmp_path: Path) -> None:
    layout = new_layout(tmp_path / "layout")
    layer = add_blob(layout, small_tar({"file": b"good"}))
    write_layout(layout, [(LAYER_TAR, layer)], {})
    blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
    blob.write_bytes(small_tar({"file": b"evil"}))  # same size, other content
    waited = await api.client.post(
        "/v1/snapshots", json={"oci_image": str(layout)}, params={"wait": True}, headers=api.auth
    )
    assert waited.status_code == 422 and "digest mismatch" in waited.json()["detail"][0]["msg"]
    # Not waited for (the default, and all the SDK can do): the record says why it failed.
    response = await api.client.post("/v1/snapshots", json={"oci_image": str(layout)}, headers=api.auth)
    assert response.status_code == 200 and response.json()["status"] == "creating"
    snapshot_id = response.json()["id"]
    for _ in range(100):
        record = (await api.client.get(f"/v1/snapshots/{snapshot_id}", headers=api.auth)).json()
        if record["status"] != "creating":
            break
        await asyncio_sleep(0.1)
    assert record["status"] == "failed" and "digest mismatch" in record["failure_reason"], record
    assert not (api.settings.snapshots_dir / snapshot_id).exists()
    assert_nothing_left(api)


async def test_a_registry_reference_fails_clearly_without_a_registry(api: Api) -> None:
    started = time.monotonic()
    response = await api.client.post(
        "/v1/snapshots", json={"oci_image": "docker.io/library/python:3.12"}, params={"wait": True},
        headers=api.auth,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert "docker.io/library/python:3.12" in message or "library/python:3.12" in message
    assert "unreachable" in message or "no registry client" in message
    assert_nothing_left(api)


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
