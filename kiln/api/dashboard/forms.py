"""Reading the dashboard's forms into the API's request models."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import FormData

from kiln.api.dashboard.web import PageError
from kiln.schemas.vms import CustomDomainRequest, ShareRequest, VMCreateRequest, VMVolumeMountRequest

MAX_PAIRS = 256


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def optional_int(form: FormData, name: str, label: str) -> int | None:
    value = text(form, name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise PageError(f"{label} must be a whole number", 422) from None


def pairs(form: FormData, name: str, label: str) -> dict[str, str] | None:
    """``KEY=VALUE`` lines (blank lines ignored) as a dict; None when empty."""
    found: dict[str, str] = {}
    for number, line in enumerate(text(form, name).splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise PageError(f"{label}, line {number}: write KEY=VALUE", 422)
        found[key.strip()] = value.strip()
    if len(found) > MAX_PAIRS:
        raise PageError(f"{label}: at most {MAX_PAIRS} entries", 422)
    return found or None


def metadata(form: FormData) -> dict[str, Any] | None:
    """Metadata as KEY=VALUE lines, or one JSON object."""
    raw = text(form, "metadata")
    if raw.startswith("{"):
        try:
            value = json.loads(raw)
        except ValueError:
            raise PageError("metadata: not valid JSON", 422) from None
        if not isinstance(value, dict):
            raise PageError("metadata: must be a JSON object", 422)
        return value
    return pairs(form, "metadata", "metadata")


def shape(form: FormData) -> tuple[int | None, int | None]:
    """``shape`` as ``<memory MB>x<vCPUs>``; none given: the server's default."""
    raw = text(form, "shape")
    if not raw:
        return None, None
    memory, sep, vcpus = raw.partition("x")
    if not sep or not memory.isdigit() or not vcpus.isdigit():
        raise PageError("shape: write <memory MB>x<vCPUs>, e.g. 512x1", 422)
    return int(memory), int(vcpus)


def words(form: FormData, name: str) -> list[str]:
    """Items separated by commas, spaces or new lines."""
    return [item for item in text(form, name).replace(",", " ").split() if item]


def egress_policy(form: FormData) -> dict[str, Any] | None:
    """None (the server's default) unless the form asks for a policy of its own:
    then only what is ticked or listed is allowed."""
    if text(form, "egress") != "policy":
        return None
    return {
        "allow_package_managers": form.get("allow_package_managers") == "on",
        "allow_http": form.get("allow_http") == "on",
        "allow_https": form.get("allow_https") == "on",
        "allowed_domains": words(form, "allowed_domains"),
        "allowed_cidrs": words(form, "allowed_cidrs"),
    }


def share(form: FormData) -> ShareRequest | None:
    port = optional_int(form, "share_port", "share port")
    if port is None:
        return None
    return ShareRequest(port=port, is_public=form.get("share_public") == "on")


def volumes(form: FormData) -> list[VMVolumeMountRequest] | None:
    """``VOLUME_ID:/mount/path`` lines, ``:ro`` at the end for read-only."""
    mounts = []
    for number, line in enumerate(text(form, "volumes").splitlines(), start=1):
        if not line.strip():
            continue
        volume_id, sep, rest = line.strip().partition(":")
        path, _, mode = rest.partition(":")
        if not sep or not volume_id or not path.startswith("/") or mode not in ("", "ro", "rw"):
            raise PageError(f"volumes, line {number}: write VOLUME_ID:/mount/path (add :ro for read-only)", 422)
        mounts.append(VMVolumeMountRequest(volume_id=volume_id, mount_path=path, mode=mode or "rw"))
    return mounts or None


def create_request(form: FormData, snapshot_id: str | None = None) -> VMCreateRequest:
    memory_mb, vcpu_count = shape(form)
    domain = text(form, "custom_domain")
    return VMCreateRequest(
        memory_mb=memory_mb,
        vcpu_count=vcpu_count,
        image_variant=text(form, "image_variant") or None,
        vm_lifetime_seconds=optional_int(form, "vm_lifetime_seconds", "lifetime"),
        env=pairs(form, "env", "env"),
        metadata=metadata(form),
        snapshot_id=snapshot_id,
        egress_policy=egress_policy(form),
        share=share(form),
        volumes=volumes(form),
        vault_ids=[str(v) for v in form.getlist("vault_ids") if isinstance(v, str) and v] or None,
        custom_domain=CustomDomainRequest(domain=domain) if domain else None,
    )
