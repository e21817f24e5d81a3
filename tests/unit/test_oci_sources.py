"""Where an OCI import may come from (kiln.services.oci_sources)."""

from __future__ import annotations

from pathlib import Path

import pytest
from unit.test_oci import TAR, make_layout, member, tar_bytes

from kiln.config import Settings
from kiln.runtime import oci
from kiln.services import oci_sources


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "roots"
    make_layout(root / "good", [(TAR, tar_bytes(member("f", data=b"x")))])
    make_layout(tmp_path / "outside", [(TAR, tar_bytes(member("f", data=b"x")))])
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "inside-link").symlink_to(root / "good")
    return root


def settings_with(roots: list[Path], registries: list[str] | None = None) -> Settings:
    return Settings(oci_import_roots=roots, oci_registries=registries or [])


async def refusal(settings: Settings, text: str) -> str:
    with pytest.raises(oci.OciError) as refused:
        await oci_sources.import_source(settings, text)
    return str(refused.value)


@pytest.mark.parametrize("configured", [False, True])
async def test_every_refused_path_gets_the_same_message(roots: Path, configured: bool) -> None:
    settings = settings_with([roots] if configured else [])
    outside = roots.parent / "outside"
    texts = [
        "/", "/etc", "/etc/passwd", "~", "~/", "~root", "/no/such/path", str(outside),
        str(roots / "escape"),  # a symlink inside a root that leads out of it
        f"{roots}/../outside",  # .. out of a root
        str(roots / "missing"), "./relative", "../up", "/tmp\0nul",
    ]
    messages = {text: await refusal(settings, text) for text in texts}
    assert set(messages.values()) == {oci_sources.LOCAL_REFUSED}, messages


async def test_a_layout_inside_a_root_is_opened_from_its_real_path(roots: Path) -> None:
    settings = settings_with([roots])
    image = await oci_sources.import_source(settings, str(roots / "inside-link"))
    assert isinstance(image, oci.OciImage)
    assert image.layout == (roots / "good").resolve()
    # Inside a root, a directory that is no layout may say so: the operator showed it.
    (roots / "empty").mkdir()
    assert "not an OCI image layout" in await refusal(settings, str(roots / "empty"))


async def test_registries_only_from_the_operators_list() -> None:
    nothing = await refusal(settings_with([]), "python:3.12")
    assert "pulls from no registry" in nothing and "KILN_OCI_REGISTRIES" in nothing
    other = await refusal(settings_with([], ["ghcr.io"]), "quay.io/a/b:1")
    assert "quay.io is not a registry this server pulls from" in other
    allowed = settings_with([], ["docker.io", "GHCR.io", "registry.example:5000"])
    for text in ("python:3.12", "ghcr.io/o/r:v1", "registry.example:5000/x"):
        assert isinstance(await oci_sources.import_source(allowed, text), oci.Reference)
    assert "not a registry" in await refusal(allowed, "registry.example/x")  # another port
    assert "neither" in await refusal(allowed, "UPPER CASE")
