"""What a custom-domain request may ask, for ``POST /v1/custom-domains`` and
``custom_domain`` in ``POST /v1/vms`` alike: problems are collected, not raised
one at a time (the API answers 422 with one ``detail`` entry each)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import Settings
from kiln.domains import names
from kiln.domains.providers import KINDS
from kiln.services.errors import FieldProblem, Location

DEFAULT_PROVIDER = "manual"


@dataclass(frozen=True)
class DomainPlan:
    domain: str
    provider: str
    credentials: dict[str, str] | None


def check_domain(
    settings: Settings,
    domain: str,
    provider: str | None,
    credentials: dict[str, str] | None,
    loc: Location = (),
) -> tuple[DomainPlan | None, list[FieldProblem]]:
    problems: list[FieldProblem] = []
    normalized = ""
    try:
        normalized = names.normalize(domain)
    except names.BadDomain as error:
        problems.append(FieldProblem((*loc, "domain"), str(error)))
    share_domain = names.normalize_or_none(settings.share_domain)
    if normalized and share_domain and names.is_within(normalized, share_domain):
        problems.append(FieldProblem((*loc, "domain"), f"names under {share_domain} are the share router's own"))
    kind = (provider or DEFAULT_PROVIDER).strip().lower()
    if kind not in KINDS:
        problems.append(FieldProblem((*loc, "dns_provider"), f"unknown DNS provider (known: {', '.join(KINDS)})"))
    else:
        for key, message in KINDS[kind].check(credentials):
            where = (*loc, "dns_credentials", key) if key else (*loc, "dns_credentials")
            problems.append(FieldProblem(where, message))
    if problems:
        return None, problems
    return DomainPlan(normalized, kind, credentials or None), []
