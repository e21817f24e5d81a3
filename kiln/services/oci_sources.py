"""Where ``POST /v1/snapshots`` may take an OCI image from (its ``oci_image``).

An API user names a host path or a registry reference; either would let them
make the server read something on their behalf. So:

- a local OCI image layout is accepted only inside the directories the operator
  lists in ``KILN_OCI_IMPORT_ROOTS`` (none by default). The path must be
  absolute; it is resolved (symlinks and ``..`` included) before it is checked,
  and from then on only the resolved path is used, so a symlink inside a root
  cannot lead out of it. Every refusal (a path that does not exist, is outside
  the roots, is not absolute, is ``/``, ``/etc`` or ``~``) answers with the one
  message ``LOCAL_REFUSED``: the answer never tells what exists on the host.
- a registry reference is accepted only for a registry the operator lists in
  ``KILN_OCI_REGISTRIES`` (none by default). Where the pull then connects is
  checked by the runtime (``kiln.runtime.registry``): never a loopback,
  link-local or private address, and never with the operator's credentials.

Anything that is not shaped like a path (``/``, ``.`` or ``~`` first) is read
as a registry reference; the file system is never probed to decide.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from kiln.config import Settings
from kiln.runtime import oci

LOCAL_REFUSED = (
    "no OCI image layout this server may import is at that path: local layouts are "
    "accepted only as absolute paths inside the directories the server's operator "
    "lists in KILN_OCI_IMPORT_ROOTS"
)
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", oci.DOCKER_HUB_API)


class ImportRefused(oci.OciError):
    """``oci_image`` names a place this server does not import from."""


def looks_like_a_path(text: str) -> bool:
    return text.startswith(("/", ".", "~"))


def resolve_local(text: str, roots: Sequence[Path]) -> Path:
    """The real path of ``text`` if it is a directory inside one of ``roots``;
    ``ImportRefused(LOCAL_REFUSED)`` for every other case, whatever it is."""
    if not roots or not text.startswith("/") or "\0" in text:
        raise ImportRefused(LOCAL_REFUSED)
    try:
        real = Path(os.path.realpath(text, strict=True))
    except (OSError, ValueError):
        raise ImportRefused(LOCAL_REFUSED) from None
    for root in roots:
        try:
            real_root = Path(os.path.realpath(Path(root).expanduser(), strict=True))
        except OSError:
            continue  # a root that is not there (yet) admits nothing
        if real.is_relative_to(real_root) and real.is_dir():
            return real
    raise ImportRefused(LOCAL_REFUSED)


def registry_names(allowed: Sequence[str]) -> frozenset[str]:
    """The allowed registries as ``Reference.registry`` spells them (lower case;
    Docker Hub under the name its API answers at)."""
    names: set[str] = set()
    for entry in allowed:
        name = entry.strip().lower().removeprefix("https://").rstrip("/")
        names.update(DOCKER_HUB_NAMES if name in DOCKER_HUB_NAMES else (name,))
    return frozenset(names)


def check_registry(reference: oci.Reference, allowed: Sequence[str]) -> None:
    if not allowed:
        raise ImportRefused(
            f"cannot pull {reference}: this server pulls from no registry (its operator "
            f"lists the allowed ones in KILN_OCI_REGISTRIES); import a local OCI image "
            f"layout instead"
        )
    if reference.registry.lower() not in registry_names(allowed):
        raise ImportRefused(
            f"cannot pull {reference}: {reference.registry} is not a registry this server "
            f"pulls from (allowed: {', '.join(sorted(allowed))})"
        )


async def import_source(settings: Settings, text: str) -> oci.OciImage | oci.Reference:
    """What ``oci_image`` names, checked: a local layout (opened and verified now,
    from its resolved path) or an allowed registry reference. ``OciError`` if not."""
    if looks_like_a_path(text):
        layout = resolve_local(text, settings.oci_import_roots)
        return await asyncio.to_thread(oci.open_layout, layout)
    reference = oci.parse_reference(text)
    if reference is None:
        raise oci.OciError(
            f"{text!r} is neither an absolute path of an OCI image layout nor a registry reference"
        )
    check_registry(reference, settings.oci_registries)
    return reference
