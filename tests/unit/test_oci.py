"""OCI layouts and layer unpacking (kiln.runtime.oci) with small synthetic tars."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from kiln.runtime import oci

# ---- building tars and layouts


def member(name: str, kind: str = "file", data: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    if kind == "file":
        info.size = len(data)
        info.mode = 0o644
    elif kind == "dir":
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = str(fields.pop("target"))
    elif kind == "hardlink":
        info.type = tarfile.LNKTYPE
        info.linkname = str(fields.pop("target"))
    elif kind == "chr":
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = fields.pop("dev")  # type: ignore[misc]
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if kind == "file" else None


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def apply(root: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> oci.UnpackReport:
    return oci.apply_layer(io.BytesIO(tar_bytes(*members)), root)


def write_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_layout(
    layout: Path,
    layers: list[tuple[str, bytes]],
    config: dict | None = None,
    platform_index: bool = False,
) -> Path:
    """``layers``: (media type, blob bytes)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config_blob = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": config or {}, "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **write_blob(layout, config_blob)},
        "layers": [{"mediaType": media_type, **write_blob(layout, blob)} for media_type, blob in layers],
    }
    manifest_descriptor = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **write_blob(layout, json.dumps(manifest).encode()),
    }
    if platform_index:
        arm = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
               **write_blob(layout, b'{"not": "used"}'), "platform": {"os": "linux", "architecture": "arm64"}}
        nested = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            arm, {**manifest_descriptor, "platform": {"os": "linux", "architecture": "amd64"}}]}
        index_blob = write_blob(layout, json.dumps(nested).encode())
        top = [{"mediaType": "application/vnd.oci.image.index.v1+json", **index_blob}]
    else:
        top = [manifest_descriptor]
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": top}))
    return layout


TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


# ---- layers


def test_a_layer_makes_files_dirs_links(tmp_path: Path) -> None:
    apply(
        tmp_path,
        member("etc", "dir"),
        member("etc/hello", data=b"hi", mode=0o640),
        member("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755),  # parents made implicitly
        member("usr/bin/alias", "symlink", target="/usr/bin/tool"),
        member("usr/bin/same", "hardlink", target="usr/bin/tool"),
        member("run/pipe", "fifo"),
    )
    assert (tmp_path / "etc/hello").read_bytes() == b"hi"
    assert (tmp_path / "etc/hello").stat().st_mode & 0o7777 == 0o640
    assert os.readlink(tmp_path / "usr/bin/alias") == "/usr/bin/tool"
    assert (tmp_path / "usr/bin/same").stat().st_ino == (tmp_path / "usr/bin/tool").stat().st_ino
    assert (tmp_path / "usr/bin/tool").stat().st_mode & 0o7777 == 0o755  # setuid cleared
    assert (tmp_path / "etc/hello").stat().st_mtime == 1_700_000_000


def test_whiteouts_delete_lower_entries_and_opaque_dirs_hide_them(tmp_path: Path) -> None:
    apply(
        tmp_path,
        member("a/keep", data=b"1"),
        member("a/gone", data=b"2"),
        member("a/sub/deep", data=b"3"),
        member("b/old1", data=b"4"),
        member("b/inner/old2", data=b"5"),
    )
    report = apply(
        tmp_path,
        member("a/.wh.gone"),
        member("a/.wh.sub"),
        member("b/.wh..wh..opq"),
        member("b/new", data=b"6"),
        member("b/inner/new2", data=b"7"),  # a/inner itself comes back, without old2
        member("c/.wh.nothing-there"),  # whiteout of a missing entry: no error
    )
    assert (tmp_path / "a/keep").exists()
    assert not (tmp_path / "a/gone").exists() and not (tmp_path / "a/sub").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "b").rglob("*")) == [
        "b/inner", "b/inner/new2", "b/new"
    ]
    assert report.whiteouts == 4
    assert not list(tmp_path.rglob(".wh.*"))  # markers are never written


def test_the_opaque_marker_may_come_after_its_siblings(tmp_path: Path) -> None:
    apply(tmp_path, member("d/old", data=b"x"))
    apply(tmp_path, member("d/new", data=b"y"), member("d/.wh..wh..opq"))
    assert sorted(os.listdir(tmp_path / "d")) == ["new"]


def test_a_later_entry_replaces_the_old_one_of_another_kind(tmp_path: Path) -> None:
    apply(tmp_path, member("x", "dir"), member("x/inside", data=b"1"), member("y", data=b"file"))
    apply(tmp_path, member("x", data=b"now a file"), member("y", "dir"))
    assert (tmp_path / "x").read_bytes() == b"now a file"
    assert (tmp_path / "y").is_dir()


def test_a_file_never_writes_through_an_old_symlink_or_hardlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("host file")
    root = tmp_path / "root"
    root.mkdir()
    apply(root, member("link", "symlink", target=str(outside)), member("a", data=b"A"),
          member("b", "hardlink", target="a"))
    apply(root, member("link", data=b"replaced"), member("b", data=b"B"))
    assert outside.read_text() == "host file"
    assert (root / "link").read_bytes() == b"replaced" and not (root / "link").is_symlink()
    assert (root / "a").read_bytes() == b"A"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../x", "/../x"])
def test_entries_climbing_out_are_left_out(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    report = apply(root, member(name, data=b"x"), member("kept", data=b"k"))
    assert report.skipped_unsafe == [name]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()
    assert [p.name for p in root.iterdir()] == ["kept"]


def test_symlinks_are_resolved_inside_the_root_never_on_the_host(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    # An absolute symlink to a host directory, and a relative one that climbs out:
    # entries through them land inside the tree, as they would in the guest.
    apply(root, member("abs", "symlink", target=str(host)), member("rel", "symlink", target="../../host"),
          member("etc", "symlink", target="/real-etc"))
    apply(root, member("abs/f1", data=b"1"), member("rel/f2", data=b"2"), member("etc/passwd", data=b"3"))
    assert list(host.iterdir()) == []
    assert (root / str(host).lstrip("/") / "f1").read_bytes() == b"1"
    assert (root / "host/f2").read_bytes() == b"2"
    assert (root / "real-etc/passwd").read_bytes() == b"3"


def test_hardlinks_to_outside_paths_stay_inside(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    root = tmp_path / "root"
    root.mkdir()
    report = apply(root, member("steal", "hardlink", target="../secret"))
    assert report.skipped_unsafe == ["/steal"] and not (root / "steal").exists()
    with pytest.raises(oci.OciError, match="not there"):
        apply(root, member("steal", "hardlink", target=str(secret)))  # /<tmp>/secret inside the tree
    apply(root, member("escape", "symlink", target=str(tmp_path)))
    with pytest.raises(oci.OciError, match="not there"):
        apply(root, member("steal", "hardlink", target="escape/secret"))


def test_device_nodes_are_never_made(tmp_path: Path) -> None:
    block = member("dev/sda1", "chr", dev=(8, 1))
    block[0].type = tarfile.BLKTYPE
    report = apply(tmp_path, member("dev/null", "chr", dev=(1, 3)), member("dev/mem", "chr", dev=(1, 1)),
                   block, member("dev/kept", data=b"a file"))
    assert report.skipped_devices == ["/dev/null", "/dev/mem", "/dev/sda1"]
    assert sorted(os.listdir(tmp_path / "dev")) == ["kept"]


def test_setuid_and_setgid_bits_are_cleared_and_reported(tmp_path: Path) -> None:
    report = apply(
        tmp_path,
        member("bin/su", data=b"\x7fELF", mode=0o4755, uid=0),
        member("bin/wall", data=b"\x7fELF", mode=0o2755),
        member("srv/shared", "dir", mode=0o2775),
        member("tmp", "dir", mode=0o1777),
        member("bin/plain", data=b"x", mode=0o755),
    )
    modes = {name: (tmp_path / name).stat().st_mode & 0o7777 for name in ("bin/su", "bin/wall", "srv/shared", "tmp")}
    assert modes == {"bin/su": 0o755, "bin/wall": 0o755, "srv/shared": 0o775, "tmp": 0o1777}  # sticky is harmless
    assert sorted(report.cleared_setid) == ["/bin/su", "/bin/wall", "/srv/shared"]


def test_only_user_xattrs_are_set(tmp_path: Path) -> None:
    info, data = member("bin/ping", data=b"\x7fELF", mode=0o755)
    info.pax_headers = {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.system.posix_acl_access": "\x02\x00\x00\x00",
        "SCHILY.xattr.user.note": "kept",
    }
    apply(tmp_path, (info, data))
    assert os.listxattr(tmp_path / "bin/ping") == ["user.note"]
    assert os.getxattr(tmp_path / "bin/ping", "user.note") == b"kept"


def test_an_image_over_the_byte_or_entry_cap_is_refused(tmp_path: Path) -> None:
    files = [member(f"f{n}", data=b"x" * 100) for n in range(10)]
    exactly = oci.UnpackLimits(max_bytes=1000, max_entries=10)
    assert oci.apply_layer(io.BytesIO(tar_bytes(*files)), tmp_path, limits=exactly).unpacked_bytes == 1000
    for limits, message in (
        (oci.UnpackLimits(max_bytes=999, max_entries=100), "more than 999 bytes"),
        (oci.UnpackLimits(max_bytes=10**6, max_entries=9), "more than 9 entries"),
    ):
        tree = tmp_path / f"tree-{limits.max_entries}"
        tree.mkdir()
        with pytest.raises(oci.OciError, match=message):
            oci.apply_layer(io.BytesIO(tar_bytes(*files)), tree, limits=limits)
    # Over several layers of one image: the count goes on from layer to layer.
    layout = make_layout(tmp_path / "layout", [(TAR, tar_bytes(*files[:6])), (TAR, tar_bytes(*files[6:]))])
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(oci.OciError, match="layer 1 .*more than 900 bytes"):
        oci.unpack(oci.open_layout(layout), tree, oci.UnpackLimits(max_bytes=900))


def test_a_huge_tar_metadata_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 64 * 1024 * 1024  # claimed, never sent: it must not be read
    stream = io.BytesIO(header.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 1024)
    with pytest.raises(oci.OciError, match="metadata header of 67108864 bytes"):
        oci.apply_layer(stream, tmp_path)


def test_a_read_only_directory_does_not_block_later_entries(tmp_path: Path) -> None:
    directories: dict = {}
    oci.apply_layer(io.BytesIO(tar_bytes(member("ro", "dir", mode=0o555))), tmp_path, None, directories)
    oci.apply_layer(io.BytesIO(tar_bytes(member("ro/file", data=b"x"))), tmp_path, None, directories)
    oci.finish_directories(directories)
    assert (tmp_path / "ro/file").read_bytes() == b"x"
    assert (tmp_path / "ro").stat().st_mode & 0o777 == 0o555


# ---- layouts


def test_a_layout_is_read_verified_and_unpacked(tmp_path: Path) -> None:
    layer1 = gzip.compress(tar_bytes(member("etc/issue", data=b"Debian"), member("etc/motd", data=b"hello")))
    layer2 = tar_bytes(member("etc/.wh.motd"), member("app/new.txt", data=b"layer 2"))
    layout = make_layout(tmp_path / "layout", [(TAR_GZIP, layer1), (TAR, layer2)],
                         {"Env": ["PATH=/usr/bin:/bin", "GREETING=a=b"], "WorkingDir": "/app"},
                         platform_index=True)
    image = oci.open_layout(layout)
    assert image.config.env == {"PATH": "/usr/bin:/bin", "GREETING": "a=b"}
    assert image.config.working_dir == "/app"
    assert len(image.layers) == 2
    tree = tmp_path / "tree"
    tree.mkdir()
    oci.unpack(image, tree)
    assert (tree / "etc/issue").read_bytes() == b"Debian"
    assert not (tree / "etc/motd").exists()
    assert (tree / "app/new.txt").read_bytes() == b"layer 2"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd tool")
def test_zstd_layers(tmp_path: Path) -> None:
    raw = tar_bytes(member("z/file", data=b"zstd!"))
    compressed = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    layout = make_layout(tmp_path / "layout", [(TAR_ZSTD, compressed)])
    tree = tmp_path / "tree"
    tree.mkdir()
    oci.unpack(oci.open_layout(layout), tree)
    assert (tree / "z/file").read_bytes() == b"zstd!"


def test_a_layer_whose_digest_does_not_match_is_refused_before_unpacking(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "layout", [(TAR, tar_bytes(member("f", data=b"good")))])
    image = oci.open_layout(layout)
    blob = oci.blob_path(layout, image.layers[0].digest)
    evil = tar_bytes(member("f", data=b"evil"))
    assert len(evil) == blob.stat().st_size
    blob.write_bytes(evil)
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(oci.DigestMismatch, match="digest mismatch"):
        oci.unpack(image, tree)
    assert list(tree.iterdir()) == []


def test_the_hashed_file_is_the_unpacked_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob swapped by path after its digest check does not get unpacked."""
    layout = make_layout(tmp_path / "layout", [(TAR, tar_bytes(member("f", data=b"good")))])
    image = oci.open_layout(layout)
    path = oci.blob_path(layout, image.layers[0].digest)
    verify = oci.verify_open_blob

    def verify_then_swap(blob, descriptor, what):  # type: ignore[no-untyped-def]
        verify(blob, descriptor, what)
        swapped = tmp_path / "evil"
        swapped.write_bytes(tar_bytes(member("f", data=b"evil")))
        os.replace(swapped, path)

    monkeypatch.setattr(oci.layers, "verify_open_blob", verify_then_swap)
    tree = tmp_path / "tree"
    tree.mkdir()
    oci.unpack(image, tree)
    assert (tree / "f").read_bytes() == b"good"


def test_blobs_are_never_read_through_a_symlink_or_from_a_fifo(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(tar_bytes(member("f", data=b"host data")))
    layout = make_layout(tmp_path / "layout", [(TAR, secret.read_bytes())])
    path = oci.blob_path(layout, oci.open_layout(layout).layers[0].digest)
    path.unlink()
    path.symlink_to(secret)  # same content and digest: only the symlink is wrong
    with pytest.raises(oci.OciError, match="missing from the layout"):
        oci.open_layout(layout)
    path.unlink()
    os.mkfifo(path)  # opening a FIFO for reading would block until a writer comes
    with pytest.raises(oci.OciError, match="missing from the layout .*not a regular file"):
        oci.open_layout(layout)
    # The layout's own files too: an index.json that is a symlink is not read.
    (layout / "index.json").rename(tmp_path / "index.json")
    (layout / "index.json").symlink_to(tmp_path / "index.json")
    with pytest.raises(oci.NotALayout):
        oci.open_layout(layout)


def test_a_private_dir_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        private = oci.private_dir(tmp_path)
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o7777 == 0o700
    assert oci.private_dir(tmp_path) == private  # idempotent
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "private").symlink_to(tmp_path)
    with pytest.raises(oci.OciError, match="not a directory"):
        oci.private_dir(tmp_path / "other")


def test_a_tampered_manifest_or_config_is_refused_when_opening(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "layout", [(TAR, tar_bytes(member("f", data=b"x")))], {"Env": ["A=1"]})
    config_digest = oci.open_layout(layout).config_digest
    path = oci.blob_path(layout, config_digest)
    path.write_bytes(path.read_bytes().replace(b"A=1", b"A=2"))
    with pytest.raises(oci.DigestMismatch):
        oci.open_layout(layout)


def test_what_is_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(oci.NotALayout):
        oci.open_layout(tmp_path)
    (tmp_path / "oci-layout").write_text("{}")
    (tmp_path / "index.json").write_text('{"manifests": []}')
    with pytest.raises(oci.NotALayout, match="imageLayoutVersion"):
        oci.open_layout(tmp_path)
    with pytest.raises(oci.NotALayout):
        oci.open_layout(tmp_path / "missing")


def test_a_layout_without_the_platform_says_which_it_has(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    arm = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **write_blob(layout, b"{}"),
           "platform": {"os": "linux", "architecture": "arm64"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [arm]}))
    with pytest.raises(oci.OciError, match="no linux/amd64 manifest.*linux/arm64"):
        oci.open_layout(layout)


def test_malformed_digests_never_become_paths(tmp_path: Path) -> None:
    with pytest.raises(oci.OciError):
        oci.blob_path(tmp_path, "sha256:../../etc/passwd")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python:3.12", "registry-1.docker.io/library/python:3.12"),
        ("docker.io/library/python:3.12", "registry-1.docker.io/library/python:3.12"),
        ("library/python", "registry-1.docker.io/library/python:latest"),
        ("ghcr.io/owner/repo/img:v1", "ghcr.io/owner/repo/img:v1"),
        ("localhost:5000/img", "localhost:5000/img:latest"),
        ("quay.io/a/b@sha256:" + "0" * 64, "quay.io/a/b@sha256:" + "0" * 64),
    ],
)
def test_registry_references(text: str, expected: str) -> None:
    reference = oci.parse_reference(text)
    assert reference is not None and str(reference) == expected


@pytest.mark.parametrize("text", ["/abs/path", "./rel", "UPPER/case", "a b", ""])
def test_what_is_not_a_registry_reference(text: str) -> None:
    assert oci.parse_reference(text) is None


async def test_an_unreachable_registry_fails_quickly(tmp_path: Path) -> None:
    reference = oci.Reference("registry.test:9", "library/python", "3.12", None)

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # port 9: nothing listens

    with pytest.raises(oci.RegistryError, match="unreachable"):
        await oci.pull(reference, tmp_path / "layout", timeout=30, connect_timeout=3,
                       resolver=loopback, allow=lambda address: True)


async def test_a_registry_on_a_private_address_is_never_contacted(tmp_path: Path) -> None:
    reference = oci.Reference("127.0.0.1:9", "library/python", "3.12", None)
    with pytest.raises(oci.RegistryError, match="127.0.0.1, a loopback, link-local or private address"):
        await oci.pull(reference, tmp_path / "layout", timeout=30, connect_timeout=3)
