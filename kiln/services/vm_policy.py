"""Server policy for VM requests: what the wire schema cannot say.

``check_create`` and ``check_update`` turn a request into the values the VM
service uses, or raise ``InvalidRequest`` listing every problem at once (the API
answers 422 with one ``detail`` entry per problem).

Every field of the founding spec's ``POST /v1/vms`` has its feature now (the
last, ``vault_ids``, with the vaults), so nothing here refuses a field as
unbuilt; one value is: the ``computer-use`` image variant (the SDK's desktops),
refused naming computer use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kiln.config import Settings
from kiln.schemas.vms import CustomDomainRequest, ShareRequest, VMCreateRequest, VMUpdateRequest
from kiln.services.domains.policy import check_domain
from kiln.services.egress_policy import canonical, check_policy
from kiln.services.errors import FieldProblem, InvalidRequest
from kiln.services.volumes.rules import mount_problems

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_ENTRIES = 256
MAX_METADATA_BYTES = 64 * 1024
MAX_SNAPSHOT_NAME_LENGTH = 255
DEFAULT_IMAGE_VARIANT = "default"
# The SDK's desktops; its routes are refused by name too (kiln.api.unavailable).
COMPUTER_USE = "computer use (desktop VMs, their viewer and VNC)"
# Image variants the SDK asks for by name that belong to a feature Kiln does not
# have: refused naming the feature, not as an unknown variant (which reads as a typo).
UNBUILT_IMAGE_VARIANTS = {"computer-use": COMPUTER_USE}


@dataclass(frozen=True)
class CreatePlan:
    """A create request after policy: every value decided."""

    session_id: str | None  # None: the service makes a new session
    lifetime: timedelta
    memory_mb: int
    vcpu_count: int
    image_variant: str
    metadata: dict[str, Any]
    env: dict[str, str]
    egress_policy: dict[str, Any] | None
    snapshot_name: str | None
    snapshot_on_terminate: bool = False
    share: ShareRequest | None = None
    custom_domain: CustomDomainRequest | None = None
    auto_suspend: bool = False
    auto_resume: bool = False


def check_create(
    request: VMCreateRequest, settings: Settings, image_variants: Collection[str]
) -> CreatePlan:
    problems: list[FieldProblem] = []
    check = _Checker(problems)

    if request.session_id is not None and not SESSION_ID_PATTERN.fullmatch(request.session_id):
        check.fail(
            ("session_id",),
            "must be 1-128 characters: letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
        )
    lifetime = check.within(
        ("vm_lifetime_seconds",),
        request.vm_lifetime_seconds,
        settings.default_lifetime_seconds,
        1,
        settings.max_lifetime_seconds,
    )
    memory_mb = check.within(
        ("memory_mb",),
        request.memory_mb,
        settings.default_memory_mb,
        settings.min_memory_mb,
        settings.vm_max_memory_mb,
    )
    vcpu_count = check.within(
        ("vcpu_count",), request.vcpu_count, settings.default_vcpu_count, 1, settings.vm_max_vcpus
    )
    image_variant = request.image_variant or DEFAULT_IMAGE_VARIANT
    if image_variant in UNBUILT_IMAGE_VARIANTS and image_variant not in image_variants:
        feature = UNBUILT_IMAGE_VARIANTS[image_variant]
        check.fail(("image_variant",), f"{feature}: not available on this server (no {image_variant} image)")
    elif image_variant not in image_variants:
        known = ", ".join(sorted(image_variants)) or "none"
        check.fail(("image_variant",), f"unknown image variant {image_variant!r} (known: {known})")
    metadata = request.metadata or {}
    check.metadata(("metadata",), metadata)
    env = request.env or {}
    _check_env(check, env)
    if request.egress_policy is not None:
        problems.extend(check_policy(request.egress_policy, ("egress_policy",)))
    check.snapshot_name(("snapshot_name",), request.snapshot_name)
    _check_volumes(check, [volume.model_dump() for volume in request.volumes or []])
    if request.custom_domain is not None:
        if request.share is None:
            check.fail(("custom_domain",), "a custom domain serves the VM's share: give share too")
        domain = request.custom_domain
        problems.extend(
            check_domain(settings, domain.domain, domain.dns_provider, domain.dns_credentials, ("custom_domain",))[1]
        )

    if problems:
        raise InvalidRequest(problems)
    return CreatePlan(
        session_id=request.session_id,
        lifetime=timedelta(seconds=lifetime),
        memory_mb=memory_mb,
        vcpu_count=vcpu_count,
        image_variant=image_variant,
        metadata=metadata,
        env=env,
        # As the VM keeps it: every key, one name per key (none given: deny all).
        egress_policy=None if request.egress_policy is None else canonical(request.egress_policy),
        snapshot_name=request.snapshot_name,
        snapshot_on_terminate=bool(request.snapshot_on_terminate),
        share=request.share,
        custom_domain=request.custom_domain,
        auto_suspend=bool(request.auto_suspend),
        auto_resume=bool(request.auto_resume),
    )


def check_update(request: VMUpdateRequest, settings: Settings) -> dict[str, Any]:
    """The fields a PATCH changes (absent or null ones are left alone), checked."""
    problems: list[FieldProblem] = []
    check = _Checker(problems)
    changes = request.model_dump(exclude_none=True)
    if changes.pop("memory_mb", None) is not None:
        # No balloon: the guest's memory is what it booted with.
        check.fail(("memory_mb",), "changing a VM's memory is not supported: make a new VM with the memory it needs")
    if "vm_lifetime_seconds" in changes:
        check.within(
            ("vm_lifetime_seconds",),
            changes["vm_lifetime_seconds"],
            settings.default_lifetime_seconds,
            1,
            settings.max_lifetime_seconds,
        )
    if "metadata" in changes:
        check.metadata(("metadata",), changes["metadata"])
    check.snapshot_name(("snapshot_name",), changes.get("snapshot_name"))
    if problems:
        raise InvalidRequest(problems)
    return changes


class _Checker:
    """Collects problems instead of raising at the first one."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems

    def fail(self, loc: tuple[str | int, ...], msg: str) -> None:
        self.problems.append(FieldProblem(loc, msg))

    def within(
        self, loc: tuple[str | int, ...], value: int | None, default: int, low: int, high: int
    ) -> int:
        if value is None:
            return default
        if not low <= value <= high:
            self.fail(loc, f"must be between {low} and {high}")
        return value

    def metadata(self, loc: tuple[str | int, ...], metadata: dict[str, Any]) -> None:
        size = len(json.dumps(metadata, separators=(",", ":")).encode())
        if size > MAX_METADATA_BYTES:
            self.fail(loc, f"must be at most {MAX_METADATA_BYTES} bytes of JSON")

    def snapshot_name(self, loc: tuple[str | int, ...], name: str | None) -> None:
        if name is not None and (
            not 1 <= len(name) <= MAX_SNAPSHOT_NAME_LENGTH or not name.isprintable()
        ):
            self.fail(loc, f"must be 1-{MAX_SNAPSHOT_NAME_LENGTH} printable characters")


def _check_env(check: _Checker, env: dict[str, str]) -> None:
    if len(env) > MAX_ENV_ENTRIES:
        check.fail(("env",), f"at most {MAX_ENV_ENTRIES} variables")
    for name, value in env.items():
        if not ENV_NAME_PATTERN.fullmatch(name):
            check.fail(("env", name), "not a valid environment variable name")
        elif "\0" in value:
            check.fail(("env", name), "value must not contain NUL characters")


def _check_volumes(check: _Checker, volumes: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for index, volume in enumerate(volumes):
        check.problems.extend(mount_problems(("volumes", index), volume["mount_path"], volume["mode"]))
        if volume["mount_path"] in seen:
            check.fail(("volumes", index, "mount_path"), f"{volume['mount_path']} is mounted twice")
        seen.add(volume["mount_path"])
