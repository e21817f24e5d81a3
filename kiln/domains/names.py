"""Domain names a user may claim, in one spelling: lowercase ASCII, no trailing dot."""

from __future__ import annotations

import ipaddress
import re

LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_NAME_LENGTH = 253
CHALLENGE_LABEL = "_acme-challenge"


class BadDomain(ValueError):
    """``str()`` says what is wrong with the name, fit to show the user."""


def normalize(name: str) -> str:
    """The one spelling of ``name``, or ``BadDomain``.

    Host names only: two labels at least, letters, digits and inner hyphens
    (international names in their ``xn--`` form), no wildcard, no address."""
    domain = name.strip().lower().removesuffix(".")
    if not domain:
        raise BadDomain("must be a domain name")
    if not domain.isascii():
        raise BadDomain("must be ASCII: give an international name in its punycode (xn--) form")
    if "*" in domain:
        raise BadDomain("wildcard domains are not supported")
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        pass
    else:
        raise BadDomain("must be a domain name, not an address")
    if len(domain) > MAX_NAME_LENGTH:
        raise BadDomain(f"must be at most {MAX_NAME_LENGTH} characters")
    labels = domain.split(".")
    if len(labels) < 2:
        raise BadDomain("must have at least two labels (e.g. app.example.com)")
    if not all(LABEL.fullmatch(label) for label in labels):
        raise BadDomain("each label must be 1-63 letters, digits or inner hyphens")
    if labels[-1].isdigit():
        raise BadDomain("the last label must not be all digits")
    return domain


def is_within(domain: str, zone: str) -> bool:
    """True when ``domain`` is ``zone`` or a name under it."""
    zone = zone.lower().removesuffix(".")
    return domain == zone or domain.endswith("." + zone)


def challenge_name(domain: str) -> str:
    """Where the ACME DNS-01 challenge of ``domain`` is published (RFC 8555, 8.4)."""
    return f"{CHALLENGE_LABEL}.{domain}"


def normalize_or_none(name: str) -> str | None:
    """``normalize`` for settings (``KILN_SHARE_DOMAIN`` may carry a port): None if no name."""
    try:
        return normalize(name.rsplit(":", 1)[0] if ":" in name else name)
    except BadDomain:
        return None
