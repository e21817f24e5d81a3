"""Volume images and chains on the host, no VM: real qemu-img, qemu-io,
qemu-storage-daemon (FUSE) and e2fsprogs on real files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from integration.volumes_fixtures import MiB, require_host_tools

from kiln.config import Settings
from kiln.volumes import VolumeBusy, VolumeExists, Volumes, VolumeTooSmall, chain, tools
from kiln.volumes.layout import Layer, VolumeMeta, VolumePaths, read_meta, write_meta


@pytest.fixture
def volumes(tmp_path: Path) -> Volumes:
    require_host_tools()
    return Volumes(Settings(data_dir=tmp_path / "var"))


def qemu_io(image: Path, *commands: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(
        [*argv, str(image)], capture_output=True, text=True, check=True
    )


def pattern_holds(image: Path, byte: int, offset: int, length: int) -> bool:
    result = qemu_io(image, f"read -P {byte} {offset} {length}")
    return "Pattern verification failed" not in result.stdout


async def test_create_measure_grow_shrink_check_delete(volumes: Volumes) -> None:
    info = await volumes.create(
        "vol1", 64 * MiB + 123
    )  # rounded down to whole 4 KiB blocks
    assert info.size_bytes == 64 * MiB
    assert info.used_bytes == 0 and info.allocated_bytes < 4 * MiB  # sparse
    with pytest.raises(VolumeExists):
        await volumes.create("vol1", 64 * MiB)
    assert (await volumes.refresh_usage("vol1")).used_bytes < 256 * 1024
    info = await volumes.resize("vol1", 128 * MiB)
    assert info.size_bytes == 128 * MiB
    outcome = await volumes.check("vol1")
    assert outcome.returncode == 0
    info = await volumes.resize("vol1", 48 * MiB)
    assert info.size_bytes == 48 * MiB
    paths = volumes.paths("vol1")
    meta = read_meta(paths)
    top = paths.layer(meta.top)
    assert int((await tools.image_info(top))["virtual-size"]) == 48 * MiB
    meta.used_bytes = 40 * MiB  # as if the guest had filled it
    write_meta(paths, meta)
    with pytest.raises(VolumeTooSmall):
        await volumes.resize("vol1", 24 * MiB)
    assert (await volumes.get("vol1")).size_bytes == 48 * MiB
    await volumes.delete("vol1")
    assert not paths.root.exists()


async def test_offline_checkpoints_are_copy_on_write_and_merge_away(
    volumes: Volumes,
) -> None:
    await volumes.create("vol2", 32 * MiB)
    paths = volumes.paths("vol2")
    first_top = paths.layer(read_meta(paths).top)
    qemu_io(first_top, "write -P 0xaa 16M 1M")
    first = await volumes.create_checkpoint("vol2", "one")
    assert first.size_bytes > 1 * MiB
    meta = read_meta(paths)
    second_top = paths.layer(meta.top)
    assert second_top != first_top and first_top.exists()  # nothing renamed
    assert first_top.stat().st_mode & 0o777 == 0o444
    assert second_top.stat().st_size < 1 * MiB  # empty: nothing copied
    qemu_io(second_top, "write -P 0xbb 16M 64k")
    await volumes.create_checkpoint("vol2", "two")
    qemu_io(paths.layer(read_meta(paths).top), "write -P 0xcc 17M 64k")

    # Each checkpoint reads as it was; the top reads all the writes.
    one = paths.layer(read_meta(paths).checkpoint_layer("one").layer_id)  # type: ignore[union-attr]
    two = paths.layer(read_meta(paths).checkpoint_layer("two").layer_id)  # type: ignore[union-attr]
    assert pattern_holds(one, 0xAA, 16 * MiB, 1 * MiB)
    assert pattern_holds(two, 0xBB, 16 * MiB, 64 * 1024) and pattern_holds(
        two, 0xAA, 16 * MiB + 64 * 1024, 960 * 1024
    )
    top = paths.layer(read_meta(paths).top)
    assert pattern_holds(top, 0xCC, 17 * MiB, 64 * 1024)

    # Deleting "one" merges its layer into "two"'s, which reads the same.
    await volumes.delete_checkpoint("vol2", "one")
    meta = read_meta(paths)
    assert [layer.checkpoint_id for layer in meta.layers] == ["two"]
    assert not one.exists()
    assert pattern_holds(two, 0xBB, 16 * MiB, 64 * 1024) and pattern_holds(
        two, 0xAA, 16 * MiB + 64 * 1024, 960 * 1024
    )
    assert (await tools.image_info(two)).get("backing-filename") is None
    await volumes.delete_checkpoint("vol2", "two")
    assert read_meta(paths).layers == []
    assert pattern_holds(top, 0xAA, 16 * MiB + 64 * 1024, 960 * 1024) and pattern_holds(
        top, 0xCC, 17 * MiB, 64 * 1024
    )
    assert sorted(p.name for p in paths.layers.iterdir()) == [top.name]
    await volumes.create_checkpoint("vol2", "same")
    with pytest.raises(VolumeBusy):
        await volumes.create_checkpoint("vol2", "same")


async def test_an_interrupted_checkpoint_is_finished_or_undone(
    volumes: Volumes,
) -> None:
    await volumes.create("vol3", 16 * MiB)
    paths = volumes.paths("vol3")
    meta = read_meta(paths)
    old_top = meta.top
    # Died after making the new top, before committing: no VM has it, so forward.
    new_id = "lnewtop000001"
    await tools.create_qcow2(paths.layer(new_id), meta.size_bytes, f"{old_top}.qcow2")
    meta.pending = {
        "op": "checkpoint",
        "new_top": new_id,
        "old_top": old_top,
        "checkpoint_id": "cp",
    }
    write_meta(paths, meta)
    assert [c.checkpoint_id for c in await volumes.checkpoints("vol3")] == ["cp"]
    meta = read_meta(paths)
    assert meta.pending is None and meta.top == new_id
    assert meta.layers == [Layer(old_top, meta.layers[0].created_at, "cp")]

    # Died before making the new top: nothing to do but forget the intent.
    meta.pending = {
        "op": "checkpoint",
        "new_top": "lneverexisted",
        "old_top": meta.top,
        "checkpoint_id": "cp2",
    }
    write_meta(paths, meta)
    assert [c.checkpoint_id for c in await volumes.checkpoints("vol3")] == ["cp"]
    assert read_meta(paths).top == new_id


async def test_recover_finishes_an_interrupted_merge(tmp_path: Path) -> None:
    require_host_tools()
    paths = VolumePaths(tmp_path / "vol")
    paths.layers.mkdir(parents=True)
    base, middle, top = "lbase00000001", "lmiddle000001", "ltop000000001"
    await tools.create_qcow2(paths.layer(base), 8 * MiB)
    qemu_io(paths.layer(base), "write -P 0x11 0 1M")
    await tools.create_qcow2(paths.layer(middle), 8 * MiB, f"{base}.qcow2")
    qemu_io(paths.layer(middle), "write -P 0x22 1M 1M")
    await tools.create_qcow2(paths.layer(top), 8 * MiB, f"{middle}.qcow2")
    meta = VolumeMeta(
        volume_id="vol",
        size_bytes=8 * MiB,
        created_at=0.0,
        top=top,
        layers=[Layer(base, 0.0, "keep"), Layer(middle, 0.0, None)],
        pending={"op": "compact", "layer_id": middle},
    )
    write_meta(paths, meta)
    await chain.recover(paths, meta)
    assert [layer.layer_id for layer in read_meta(paths).layers] == [base]
    assert not paths.layer(middle).exists()
    assert pattern_holds(paths.layer(top), 0x11, 0, 1 * MiB) and pattern_holds(
        paths.layer(top), 0x22, 1 * MiB, 1 * MiB
    )
