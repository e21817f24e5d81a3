"""The guest tool's file operations, run here on a host directory standing in
for a mounted volume (they are plain POSIX calls; only mount/freeze/grow need
a guest kernel and are covered by the integration tests)."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from kiln.volumes import guest_tool
from kiln.volumes.guest_tool import Refused


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "volume"
    root.mkdir()
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("a")
    (root / "docs" / "b.txt").write_text("bb")
    (root / "docs" / "deep").mkdir()
    (root / "docs" / "deep" / "c.txt").write_text("ccc")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    (root / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    (root / "docs" / "up").symlink_to("../..")
    return root


def call(name: str, **args: object) -> dict:
    return guest_tool.OPS[name](args)


def refused(code: str, name: str, **args: object) -> None:
    with pytest.raises(Refused) as caught:
        call(name, **args)
    assert caught.value.code == code, caught.value.message


def test_paths_are_plain_components() -> None:
    assert guest_tool.components("") == []
    assert guest_tool.components("/a//b/./c/") == ["a", "b", "c"]
    for bad in ("../x", "a/../b", "a/\0"):
        with pytest.raises(Refused):
            guest_tool.components(bad)


def test_no_operation_follows_a_symlink(volume: Path, tmp_path: Path) -> None:
    root = str(volume)
    refused("ELOOP", "file_open_read", root=root, path="link")
    refused("ELOOP", "file_open_read", root=root, path="dirlink/secret")
    refused("ELOOP", "file_open_read", root=root, path="docs/up/outside/secret")
    refused("ELOOP", "file_begin_write", root=root, path="dirlink/new", overwrite=True)
    refused("ELOOP", "file_begin_write", root=root, path="link", overwrite=True)
    refused("ELOOP", "file_delete", root=root, path="dirlink/secret")
    refused("ELOOP", "file_list", root=root, prefix="dirlink/")
    refused("EINVAL", "file_open_read", root=root, path="../outside/secret")
    # Deleting a link removes the link, never what it points to.
    call("file_delete", root=root, path="link")
    assert not (volume / "link").is_symlink()
    assert (tmp_path / "outside" / "secret").read_text() == "host secret"
    assert sorted(os.listdir(tmp_path / "outside")) == ["secret"]


def test_stat_describes_a_link_without_following_it(volume: Path) -> None:
    entry = call("file_stat", root=str(volume), path="dirlink")
    assert entry["kind"] == "symlink" and not entry["is_dir"] and entry["size"] == 0
    assert call("file_stat", root=str(volume), path="docs")["is_dir"]
    refused("ENOENT", "file_stat", root=str(volume), path="docs/missing")


def test_an_upload_is_a_temporary_file_renamed_over_its_target(volume: Path) -> None:
    root = str(volume)
    begun = call("file_begin_write", root=root, path="new/dir/file.bin")
    assert (volume / "new" / "dir").is_dir()
    Path(begun["guest_path"]).write_bytes(b"\0\xff data")
    assert call("file_list", root=root, prefix="new/dir/") == {
        "entries": [],
        "truncated": False,
    }
    entry = call(
        "file_commit_write",
        root=root,
        path="new/dir/file.bin",
        temporary=begun["temporary"],
    )
    assert (
        entry["size"] == 7
        and (volume / "new/dir/file.bin").read_bytes() == b"\0\xff data"
    )
    assert os.listdir(volume / "new" / "dir") == ["file.bin"]
    refused("EEXIST", "file_begin_write", root=root, path="new/dir/file.bin")
    refused("EISDIR", "file_begin_write", root=root, path="docs", overwrite=True)
    again = call("file_begin_write", root=root, path="new/dir/file.bin", overwrite=True)
    call(
        "file_abort_write",
        root=root,
        path="new/dir/file.bin",
        temporary=again["temporary"],
    )
    assert os.listdir(volume / "new" / "dir") == ["file.bin"]
    refused(
        "EINVAL",
        "file_abort_write",
        root=root,
        path="new/dir/file.bin",
        temporary="../../etc",
    )


def test_listing_by_prefix_recursive_and_limited(volume: Path) -> None:
    root = str(volume)

    def paths(**args: object) -> list[str]:
        return [
            entry["path"] for entry in call("file_list", root=root, **args)["entries"]
        ]

    assert paths() == ["dirlink", "docs", "link"]
    assert paths(prefix="docs/") == ["docs/a.txt", "docs/b.txt", "docs/deep", "docs/up"]
    assert paths(prefix="docs/a") == ["docs/a.txt"]
    assert paths(prefix="do", recursive=True) == [
        "docs", "docs/a.txt", "docs/b.txt", "docs/deep", "docs/deep/c.txt", "docs/up",
    ]  # fmt: skip
    assert paths(prefix="nothing/here/") == []
    limited = call("file_list", root=root, recursive=True, limit=2)
    assert len(limited["entries"]) == 2 and limited["truncated"]
    sizes = {
        e["path"]: e["size"]
        for e in call("file_list", root=root, prefix="docs/")["entries"]
    }
    assert sizes["docs/b.txt"] == 2


def test_a_recursive_delete_stays_inside(volume: Path, tmp_path: Path) -> None:
    (volume / "docs" / "deep" / "escape").symlink_to(tmp_path / "outside")
    refused("ENOTEMPTY", "file_delete", root=str(volume), path="docs")
    call("file_delete", root=str(volume), path="docs", recursive=True)
    assert not (volume / "docs").exists()
    assert (tmp_path / "outside" / "secret").read_text() == "host secret"
    refused("EINVAL", "file_delete", root=str(volume), path="")


def test_answer_prints_one_json_line() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        guest_tool.answer(json.dumps({"op": "no-such-op"}))
        guest_tool.answer(
            json.dumps(
                {"op": "file_stat", "args": {"root": "/nonexistent", "path": "x"}}
            )
        )
        guest_tool.answer("not json")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["ok"] for line in lines] == [False, False, False]
    assert [line["error"] for line in lines] == ["EINVAL", "ENOENT", "EINVAL"]


def test_mountinfo_fields_are_unescaped() -> None:
    assert (
        guest_tool.unescape_mount_field(r"/mnt/with\040space\134x")
        == "/mnt/with space\\x"
    )
    assert guest_tool.unescape_mount_field("/plain") == "/plain"


def test_freeze_tokens_name_mount_paths_uniquely() -> None:
    assert guest_tool.freeze_token_path("/data") != guest_tool.freeze_token_path(
        "/da/ta"
    )
