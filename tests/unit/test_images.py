"""Image manifests, the store's bookkeeping and the build helpers that need no network."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import pytest

from kiln.config import Settings
from kiln.runtime.images import (
    REPO_IMAGES_DIR,
    CpioWriter,
    ImageStore,
    Manifest,
    UnknownVariant,
    build_initramfs,
    module_dependencies,
    resolve_module_order,
)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Settings(cache_dir=tmp_path / "cache", data_dir=tmp_path / "var"))


def test_repository_manifests_load() -> None:
    for variant in ("default", "minimal"):
        manifest = Manifest.load(variant, REPO_IMAGES_DIR / f"{variant}.toml")
        assert "python3" in manifest.packages
        assert "virtio_blk" in manifest.kernel_modules and "virtio_console" in manifest.kernel_modules
    assert Manifest.load("default", REPO_IMAGES_DIR / "default.toml").workdir == "/app"


def test_base_layer_key_ignores_what_does_not_reach_mmdebstrap(tmp_path: Path) -> None:
    text = (REPO_IMAGES_DIR / "minimal.toml").read_text()
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text.replace("free_space_mb = 256", "free_space_mb = 300"))
    more = 'packages = ["python3", "e2fsprogs", "vim"]'
    (tmp_path / "c.toml").write_text(text.replace('packages = ["python3", "e2fsprogs"]', more))
    key = {name: Manifest.load(name, tmp_path / f"{name}.toml").base_layer_key() for name in "abc"}
    assert key["a"] == key["b"]
    assert key["a"] != key["c"]


def test_variants_get_and_describe_before_any_build(store: ImageStore) -> None:
    assert {"default", "minimal"} <= set(store.variants())
    assert store.get("default") is None
    with pytest.raises(UnknownVariant):
        store.get("no-such-variant")
    with pytest.raises(UnknownVariant):
        store.manifest("../default")
    rows = {row["variant"]: row for row in store.describe()}
    assert rows["minimal"]["built"] is False and rows["minimal"]["path"] is None


def test_get_follows_the_current_pointer(store: ImageStore) -> None:
    build_dir = store.images_dir / "minimal-0123456789abcdef"
    build_dir.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "rootfs.ext4"):
        (build_dir / name).write_bytes(b"x")
    (build_dir / "build.json").write_text(json.dumps(
        {"cmdline": "console=ttyS0", "built_at": "2025-01-01T00:00:00+00:00", "local_inputs": "old"}))
    os.symlink(build_dir.name, store.images_dir / "minimal.current")

    image = store.get("minimal")
    assert image is not None
    assert image.variant == "minimal" and image.rootfs == build_dir / "rootfs.ext4"
    assert image.cmdline == "console=ttyS0"
    row = next(row for row in store.describe() if row["variant"] == "minimal")
    assert row["built"] is True and row["path"] == str(build_dir) and row["stale"] is True


def fake_module(path: Path, depends: str) -> None:
    """A minimal 64-bit ELF with a section header table, .shstrtab and .modinfo."""
    names = b"\0.shstrtab\0.modinfo\0"
    modinfo = b"license=GPL\0" + f"depends={depends}\0".encode() + b"vermagic=6.1\0"
    names_at = 64
    modinfo_at = names_at + len(names)
    sections_at = modinfo_at + len(modinfo)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, sections_at)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)
    sections = b"".join([
        struct.pack("<IIQQQQ", 0, 0, 0, 0, 0, 0) + bytes(24),
        struct.pack("<IIQQQQ", 1, 3, 0, 0, names_at, len(names)) + bytes(24),
        struct.pack("<IIQQQQ", 11, 1, 0, 0, modinfo_at, len(modinfo)) + bytes(24),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(header) + names + modinfo + sections)


def test_module_order_puts_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    fake_module(kernel / "drivers/virtio/virtio_ring.ko", "")
    fake_module(kernel / "drivers/virtio/virtio.ko", "virtio_ring")
    fake_module(kernel / "drivers/net/net_failover.ko", "failover")
    fake_module(kernel / "net/core/failover.ko", "")
    fake_module(kernel / "drivers/net/virtio_net.ko", "virtio_ring,virtio,net_failover")
    fake_module(kernel / "drivers/block/virtio_blk.ko", "virtio,virtio_ring,crc16")
    (tmp_path / "modules.builtin").write_text("kernel/lib/crc16.ko\n")

    assert module_dependencies(kernel / "drivers/net/virtio_net.ko") == ["virtio_ring", "virtio", "net_failover"]
    order = resolve_module_order(tmp_path, ["virtio_net", "virtio_blk"])
    names = [Path(module).name for module in order]
    assert names == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net", "virtio_blk"]
    assert order[0] == "kernel/drivers/virtio/virtio_ring"


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes, int]]:
    """name -> (mode, data, rdev major) from a newc cpio archive."""
    entries, offset = {}, 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + i * 8 : offset + 14 + i * 8], 16) for i in range(13)]
        mode, size, rdev_major, name_size = fields[1], fields[6], fields[9], fields[11]
        name_at = offset + 110
        name = archive[name_at : name_at + name_size - 1].decode()
        data_at = name_at + name_size + (-(name_at + name_size) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, archive[data_at : data_at + size], rdev_major)
        offset = data_at + size + (-(data_at + size) % 4)


def test_cpio_writer_round_trips() -> None:
    archive = CpioWriter()
    archive.directory("dev")
    archive.char_device("dev/console", 5, 1)
    archive.file("init", b"#!/bin/sh\n", 0o755)
    entries = read_newc(archive.finish())
    assert entries["init"] == (0o100755, b"#!/bin/sh\n", 0)
    assert entries["dev/console"][0] == 0o020600 and entries["dev/console"][2] == 5


def test_initramfs_carries_init_busybox_and_ordered_modules(tmp_path: Path) -> None:
    fake_module(tmp_path / "kernel/drivers/virtio/virtio_ring.ko", "")
    fake_module(tmp_path / "kernel/drivers/virtio/virtio.ko", "virtio_ring")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    image = build_initramfs(busybox, tmp_path, ["kernel/drivers/virtio/virtio_ring", "kernel/drivers/virtio/virtio"],
                            REPO_IMAGES_DIR / "init" / "initramfs-init")
    entries = read_newc(gzip.decompress(image))
    assert entries["init"][0] == 0o100755 and entries["init"][1].startswith(b"#!/bin/busybox sh")
    assert entries["bin/busybox"][1] == b"\x7fELF busybox"
    assert entries["etc/kiln-modules"][1] == b"virtio_ring\nvirtio\n"
    assert "lib/modules/virtio.ko" in entries and "dev/console" in entries


# ---- root trees shared with OCI imports (install_guest, find_guest_python)


def _python_tree(root: Path, version: str = "3.11", modules: tuple[str, ...] = ("json", "asyncio"),
                 prefix: str = "usr") -> Path:
    bin_dir = root / prefix / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / f"python{version}").write_text("#!elf\n")
    (bin_dir / f"python{version}").chmod(0o755)
    (bin_dir / "python3").symlink_to(f"python{version}")
    lib = root / prefix / "lib" / f"python{version}"
    lib.mkdir(parents=True)
    (lib / "os.py").write_text("")
    for module in modules:
        (lib / module).mkdir()
        (lib / module / "__init__.py").write_text("")
    return root


def test_find_guest_python(tmp_path: Path) -> None:
    from kiln.runtime.images import UnsuitableRootfs, find_guest_python

    assert find_guest_python(_python_tree(tmp_path / "debian")) == "/usr/bin/python3"
    assert find_guest_python(_python_tree(tmp_path / "docker", "3.12", prefix="usr/local")) == "/usr/local/bin/python3"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsuitableRootfs, match="the image has no python3"):
        find_guest_python(tmp_path / "empty")
    with pytest.raises(UnsuitableRootfs, match="is 3.8; the guest agent needs python3 >= 3.9"):
        find_guest_python(_python_tree(tmp_path / "old", "3.8"))
    with pytest.raises(UnsuitableRootfs, match="lacks the standard library modules asyncio"):
        find_guest_python(_python_tree(tmp_path / "minimal", modules=("json",)))


def test_install_guest_never_writes_through_the_trees_symlinks(tmp_path: Path) -> None:
    from kiln.runtime.images import REPO_IMAGES_DIR, install_guest

    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "hostname").write_text("the host\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "etc").symlink_to(host)  # an image's absolute symlink: /<tmp>/host-etc in the guest
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    install_guest(tree, busybox, REPO_IMAGES_DIR / "init", workdir="/work dir", python="/usr/local/bin/python3")
    assert (host / "hostname").read_text() == "the host\n" and sorted(p.name for p in host.iterdir()) == ["hostname"]
    etc = tree / str(host).lstrip("/")
    inittab = (etc / "inittab").read_text()
    assert "/usr/local/bin/python3 -S -m agent --workdir '/work dir'" in inittab
    assert (etc / "hostname").read_text() == "kiln\n"
    assert (tree / "work dir").is_dir()
    assert os.readlink(tree / "bin" / "sh") == "/opt/kiln/busybox"
    assert (tree / "opt/kiln/agent/__main__.py").is_file() and (tree / "opt/kiln/protocol.py").is_file()
    assert (tree / "opt/kiln/agent/__pycache__").is_dir(), "the agent is precompiled"
    assert (tree / "opt/kiln/busybox").stat().st_mode & 0o111
