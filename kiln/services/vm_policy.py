"""Server policy for VM requests: what the wire schema cannot say.

``check_create`` and ``check_update`` turn a request into the values the VM
service uses, or raise ``InvalidRequest`` listing every problem at once (the API
answers 422 with one ``detail`` entry per problem).

Fields of features Kiln has not built yet are refused in ``refuse_unbuilt``,
and only there: a client must never believe a share, a volume or a vault is in
place when it is not. Each later feature deletes its line from that function.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kiln.config import Settings
from kiln.node.participant import EgressRules
from kiln.schemas.vms import ShareRequest, VMCreateRequest, VMUpdateRequest
from kiln.services.errors import FieldProblem, InvalidRequest

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_ENTRIES = 256
MAX_METADATA_BYTES = 64 * 1024
MAX_SNAPSHOT_NAME_LENGTH = 255
# Guest paths a volume must never cover: the guest's own kernel interfaces.
RESERVED_MOUNT_ROOTS = ("/proc", "/sys", "/dev")
MOUNT_MODES = ("rw", "ro")
DEFAULT_IMAGE_VARIANT = "default"

PACKAGE_MANAGER_FLAGS = ("allow_package_managers", "allow_public_repos")
EGRESS_FLAGS = (*PACKAGE_MANAGER_FLAGS, "allow_http", "allow_https")
EGRESS_LISTS = ("allowed_domains", "allowed_cidrs")


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
    if image_variant not in image_variants:
        known = ", ".join(sorted(image_variants)) or "none"
        check.fail(("image_variant",), f"unknown image variant {image_variant!r} (known: {known})")
    metadata = request.metadata or {}
    check.metadata(("metadata",), metadata)
    env = request.env or {}
    _check_env(check, env)
    if request.egress_policy is not None:
        _check_egress_policy(check, request.egress_policy)
    check.snapshot_name(("snapshot_name",), request.snapshot_name)
    _check_volumes(check, [volume.model_dump() for volume in request.volumes or []])
    problems.extend(refuse_unbuilt(request))

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
        egress_policy=request.egress_policy,
        snapshot_name=request.snapshot_name,
        snapshot_on_terminate=bool(request.snapshot_on_terminate),
        share=request.share,
        auto_suspend=bool(request.auto_suspend),
        auto_resume=bool(request.auto_resume),
    )


def check_update(request: VMUpdateRequest, settings: Settings) -> dict[str, Any]:
    """The fields a PATCH changes (absent or null ones are left alone), checked."""
    problems: list[FieldProblem] = []
    check = _Checker(problems)
    changes = request.model_dump(exclude_none=True)
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
    problems.extend(refuse_unbuilt(request))
    if problems:
        raise InvalidRequest(problems)
    return changes


def refuse_unbuilt(request: VMCreateRequest | VMUpdateRequest) -> list[FieldProblem]:
    """Problems for request fields whose feature does not exist yet.

    THE one place that knows which features are missing: a feature's issue
    removes its line here when it makes the field work.
    """
    given = request.model_dump(exclude_none=True)
    problems: list[FieldProblem] = []

    def refuse(name: str, what: str) -> None:
        problems.append(FieldProblem((name,), f"{what} is not supported yet"))

    if "custom_domain" in given:
        refuse("custom_domain", "a custom domain")
    if given.get("volumes"):
        refuse("volumes", "mounting volumes")
    policy = given.get("egress_policy") or {}
    for flag in PACKAGE_MANAGER_FLAGS:
        if policy.get(flag):
            refuse("egress_policy", f"{flag} (the package-manager domain group)")
    return problems


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


def _check_egress_policy(check: _Checker, policy: dict[str, Any]) -> None:
    for key, value in policy.items():
        if key in EGRESS_FLAGS:
            if not isinstance(value, bool):
                check.fail(("egress_policy", key), "must be a boolean")
        elif key in EGRESS_LISTS:
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                check.fail(("egress_policy", key), "must be a list of strings")
        else:
            check.fail(("egress_policy", key), "unknown egress policy key")


def egress_rules(policy: dict[str, Any] | None) -> EgressRules:
    """The rules a (checked) ``egress_policy`` asks for; none given: nothing is
    reachable (deny by default)."""
    policy = policy or {}
    return EgressRules(
        allowed_cidrs=tuple(policy.get("allowed_cidrs") or ()),
        allowed_domains=tuple(policy.get("allowed_domains") or ()),
        allow_http=bool(policy.get("allow_http")),
        allow_https=bool(policy.get("allow_https")),
    )


def _check_volumes(check: _Checker, volumes: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for index, volume in enumerate(volumes):
        path = volume["mount_path"]
        loc = ("volumes", index, "mount_path")
        # normpath keeps a leading "//" (POSIX allows it a meaning); the guest does not.
        normalized = "/" + posixpath.normpath(path).lstrip("/")
        if not path.startswith("/") or "\0" in path:
            check.fail(loc, "must be an absolute path")
        elif normalized == "/" or any(
            normalized == root or normalized.startswith(root + "/")
            for root in RESERVED_MOUNT_ROOTS
        ):
            check.fail(loc, f"must not be / or under {', '.join(RESERVED_MOUNT_ROOTS)}")
        elif normalized in seen:
            check.fail(loc, f"{normalized} is mounted twice")
        seen.add(normalized)
        if volume["mode"] not in MOUNT_MODES:
            check.fail(("volumes", index, "mode"), "must be 'rw' or 'ro'")
