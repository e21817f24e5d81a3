"""What an egress policy says: its keys, the form a VM keeps it in, and the
rules the node enforces for it.

A policy is the JSON object of ``egress_policy`` in ``POST /v1/vms`` and the
body of ``POST /v1/egress/vm/{vm_id}`` (and ``.../session/{sid}``):

- ``allowed_cidrs``: IPv4 addresses or CIDRs the VM may reach over any protocol;
- ``allowed_domains``: host names and ``*.domain`` wildcards, reachable over
  HTTP when ``allow_http`` and over HTTPS when ``allow_https``;
- ``allow_package_managers`` (InstaVM's SDK sends it as ``allow_public_repos``:
  the same key): the package-manager group, a list of registry domains in an
  operator-editable TOML file, reachable over HTTP and HTTPS both.

Absent keys are false or empty; no policy at all reaches nothing. A VM keeps its
policy in ``canonical`` form (every key, the group's flag under one name), and
``EgressPolicies.rules`` turns that into the node's ``EgressRules``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.node.network import EgressRefused, check_rules
from kiln.node.node import NETWORKING_OFF, Node
from kiln.node.participant import EgressRules
from kiln.services.errors import FieldProblem, Location

PACKAGE_MANAGERS = "allow_package_managers"
PUBLIC_REPOS = "allow_public_repos"  # InstaVM's name of the same key
SCHEME_FLAGS = ("allow_http", "allow_https")
LISTS = ("allowed_domains", "allowed_cidrs")
DEFAULT_PACKAGE_MANAGERS_FILE = Path(__file__).with_name("package_managers.toml")


class PackageManagersFileError(ValueError):
    """The package-manager group's file cannot be used; ``str()`` says which and why."""


def check_policy(policy: dict[str, Any], loc: Location) -> list[FieldProblem]:
    """The problems of a policy's keys and values, each located under ``loc``."""
    problems: list[FieldProblem] = []
    for key, value in policy.items():
        if key in (PACKAGE_MANAGERS, PUBLIC_REPOS, *SCHEME_FLAGS):
            if not isinstance(value, bool):
                problems.append(FieldProblem((*loc, key), "must be a boolean"))
        elif key in LISTS:
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                problems.append(FieldProblem((*loc, key), "must be a list of strings"))
        else:
            problems.append(FieldProblem((*loc, key), "unknown egress policy key"))
    both = (policy.get(PACKAGE_MANAGERS), policy.get(PUBLIC_REPOS))
    if all(isinstance(flag, bool) for flag in both) and both[0] != both[1]:
        problems.append(
            FieldProblem((*loc, PUBLIC_REPOS), f"is {PACKAGE_MANAGERS} under another name: the two disagree")
        )
    return problems


def canonical(policy: dict[str, Any] | None) -> dict[str, Any]:
    """A checked policy with every key, the package-manager flag as ``allow_package_managers``."""
    policy = policy or {}
    return {
        PACKAGE_MANAGERS: bool(policy.get(PACKAGE_MANAGERS, policy.get(PUBLIC_REPOS, False))),
        "allow_http": bool(policy.get("allow_http", False)),
        "allow_https": bool(policy.get("allow_https", False)),
        "allowed_domains": list(policy.get("allowed_domains") or []),
        "allowed_cidrs": list(policy.get("allowed_cidrs") or []),
    }


def allows_anything(policy: dict[str, Any] | None) -> bool:
    """False for a policy that reaches nothing (domains without a scheme reach nothing)."""
    wanted = canonical(policy)
    schemes = wanted["allow_http"] or wanted["allow_https"]
    return bool(wanted["allowed_cidrs"]) or wanted[PACKAGE_MANAGERS] or (schemes and bool(wanted["allowed_domains"]))


def network_error(policy: dict[str, Any] | None, node: Node) -> str | None:
    """Why a VM with ``policy`` reaches nothing on this node although it asked
    for egress (the host gives VMs no network); None when that is not so."""
    if node.wires_networks or not allows_anything(policy):
        return None
    reason = node.networking.status.reason if node.networking is not None else NETWORKING_OFF
    return f"the host gives VMs no network, so this VM reaches nothing: {reason}"


@dataclass(frozen=True)
class EgressPolicies:
    """Stored policies into the node's rules, with this server's package-manager group."""

    package_manager_domains: tuple[str, ...]
    source: Path

    @classmethod
    def load(cls, path: Path | None) -> EgressPolicies:
        """The group from ``path`` (None: the file Kiln ships). One table per
        ecosystem, each holding only ``domains = [...]``."""
        path = path or DEFAULT_PACKAGE_MANAGERS_FILE
        where = f"the package-manager file {path} (KILN_EGRESS_PACKAGE_MANAGERS_FILE)"
        try:
            data = tomllib.loads(path.read_text())
        except OSError as error:
            raise PackageManagersFileError(f"{where} cannot be read: {error.strerror or error}") from error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise PackageManagersFileError(f"{where} is not TOML: {error}") from error
        domains: list[str] = []
        for name, table in data.items():
            listed = table.get("domains") if isinstance(table, dict) else None
            if (
                not isinstance(table, dict)
                or set(table) != {"domains"}
                or not isinstance(listed, list)
                or not all(isinstance(domain, str) for domain in listed)
            ):
                raise PackageManagersFileError(f'{where}: [{name}] must hold only domains = ["host", ...]')
            domains.extend(listed)
        unique = tuple(dict.fromkeys(domain.strip().lower() for domain in domains))
        try:
            check_rules(EgressRules(web_domains=unique))
        except EgressRefused as error:
            raise PackageManagersFileError(f"{where}: {error}") from error
        return cls(unique, path)

    def rules(self, policy: dict[str, Any] | None) -> EgressRules:
        """What the node enforces for a (checked) policy; none given: nothing is reachable."""
        wanted = canonical(policy)
        return EgressRules(
            allowed_cidrs=tuple(wanted["allowed_cidrs"]),
            allowed_domains=tuple(wanted["allowed_domains"]),
            allow_http=wanted["allow_http"],
            allow_https=wanted["allow_https"],
            web_domains=self.package_manager_domains if wanted[PACKAGE_MANAGERS] else (),
        )
