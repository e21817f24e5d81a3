"""The ``rfc2136`` provider: records published by dynamic DNS update (RFC 2136),
signed with a TSIG key (RFC 8945), sent over TCP to the zone's primary server.

``dns_credentials``: ``server`` (``host[:port]``, port 53 by default),
``key_name``, ``secret`` (base64), ``algorithm`` (``hmac-sha256`` by default;
also ``hmac-sha512``, ``hmac-sha384``, ``hmac-sha224``, ``hmac-sha1``,
``hmac-md5``), and ``zone`` (optional: else the server is asked which of its
zones holds the domain).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from kiln.domains.addresses import resolve_host, split_host_port
from kiln.domains.errors import DnsError, UpdateRefused
from kiln.domains.records import DnsRecord

ALGORITHMS: dict[str, dns.name.Name] = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-md5": dns.tsig.HMAC_MD5,
}
DEFAULT_ALGORITHM = "hmac-sha256"
REQUIRED = ("server", "key_name", "secret")
KNOWN = (*REQUIRED, "algorithm", "zone")
RCODE_HINTS = {
    dns.rcode.NOTAUTH: "the key may not update this zone (NOTAUTH)",
    dns.rcode.REFUSED: "the server refused the update (REFUSED): the key is not allowed, or it is no primary",
    dns.rcode.NOTZONE: "a record is outside the zone (NOTZONE)",
    dns.rcode.SERVFAIL: "the server failed to apply the update (SERVFAIL)",
}


def algorithm_name(text: str | None) -> str:
    return (text or DEFAULT_ALGORITHM).strip().lower().removesuffix(".")


def check_credentials(credentials: dict[str, str] | None) -> list[tuple[str, str]]:
    """What is wrong with ``dns_credentials`` for rfc2136 (nothing is sent anywhere)."""
    given = credentials or {}
    problems = [(key, "is required for the rfc2136 provider") for key in REQUIRED if not given.get(key, "").strip()]
    problems += [(key, f"unknown rfc2136 credential (known: {', '.join(KNOWN)})") for key in given if key not in KNOWN]
    if given.get("server", "").strip():
        try:
            split_host_port(given["server"])
        except ValueError as error:
            problems.append(("server", str(error)))
    if given.get("secret", "").strip():
        try:
            if not base64.b64decode(given["secret"].strip(), validate=True):
                problems.append(("secret", "must not be empty"))
        except (binascii.Error, ValueError):
            problems.append(("secret", "must be the TSIG secret in base64"))
    if algorithm_name(given.get("algorithm")) not in ALGORITHMS:
        problems.append(("algorithm", f"must be one of {', '.join(ALGORITHMS)}"))
    for key in ("key_name", "zone"):
        if given.get(key, "").strip():
            try:
                dns.name.from_text(given[key].strip())
            except dns.exception.DNSException:
                problems.append((key, "must be a DNS name"))
    return problems


class Rfc2136Provider:
    name = "rfc2136"
    publishes = True

    def __init__(self, credentials: dict[str, str], *, allow_private: bool, timeout: float) -> None:
        self._host, self._port = split_host_port(credentials["server"])
        self._key_name = dns.name.from_text(credentials["key_name"].strip())
        self._algorithm = ALGORITHMS[algorithm_name(credentials.get("algorithm"))]
        self._keyring = {self._key_name: dns.tsig.Key(self._key_name, credentials["secret"].strip(), self._algorithm)}
        zone = credentials.get("zone", "").strip()
        self._zone = dns.name.from_text(zone) if zone else None
        self._allow_private = allow_private
        self._timeout = timeout
        self._address: str | None = None

    def servers(self) -> list[tuple[str, int]]:
        return [(self._address, self._port)] if self._address else []

    @property
    def where(self) -> str:
        return f"{self._host}:{self._port}"

    async def publish(self, records: Sequence[DnsRecord]) -> None:
        """Each record replaces its name's set of that type (one A, one challenge TXT)."""
        update = await self._update(records)
        for record in records:
            update.replace(_absolute(record.name), record.ttl, record.type, _rdata_text(record))
        await self._send(update, "publish")

    async def remove(self, records: Sequence[DnsRecord]) -> None:
        """Only the records Kiln published (same name, type and value) go."""
        if not records:
            return
        update = await self._update(records)
        for record in records:
            update.delete(_absolute(record.name), record.type, _rdata_text(record))
        await self._send(update, "remove")

    # -- internals

    async def _update(self, records: Sequence[DnsRecord]) -> dns.update.UpdateMessage:
        self._address = await resolve_host(self._host, allow_private=self._allow_private)
        zone = self._zone or await self._find_zone(records[0].name)
        for record in records:
            if not _absolute(record.name).is_subdomain(zone):
                raise DnsError(f"{record.name} is not in the zone {zone.to_text(omit_final_dot=True)}")
        return dns.update.UpdateMessage(
            zone, keyring=self._keyring, keyname=self._key_name, keyalgorithm=self._algorithm
        )

    async def _find_zone(self, name: str) -> dns.name.Name:
        """The server's zone holding ``name``: the SOA it answers with, in the
        answer (``name`` is the zone's apex) or in the authority section."""
        assert self._address is not None
        query = dns.message.make_query(_absolute(name), dns.rdatatype.SOA)
        query.flags &= ~dns.flags.RD
        try:
            response = await dns.asyncquery.tcp(query, self._address, port=self._port, timeout=self._timeout)
        except (OSError, dns.exception.DNSException) as error:
            raise DnsError(f"no answer from the DNS server {self.where} ({_describe(error)})") from error
        for section in (response.answer, response.authority):
            for rrset in section:
                if rrset.rdtype == dns.rdatatype.SOA and _absolute(name).is_subdomain(rrset.name):
                    return rrset.name
        raise DnsError(
            f"the DNS server {self.where} holds no zone for {name} ({dns.rcode.to_text(response.rcode())}); "
            "name the zone in dns_credentials.zone, or use the zone's primary server"
        )

    async def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        assert self._address is not None
        key = self._key_name.to_text(omit_final_dot=True)
        try:
            response = await dns.asyncquery.tcp(update, self._address, port=self._port, timeout=self._timeout)
        except dns.tsig.PeerBadKey as error:
            raise UpdateRefused(f"the DNS server {self.where} does not know the TSIG key {key!r} (BADKEY)") from error
        except dns.tsig.PeerBadSignature as error:
            raise UpdateRefused(
                f"the DNS server {self.where} rejected the TSIG signature of key {key!r} (BADSIG): "
                "its secret or algorithm is wrong"
            ) from error
        except dns.tsig.PeerBadTime as error:
            raise UpdateRefused(
                f"the DNS server {self.where} rejected the update's time (BADTIME): check the clocks"
            ) from error
        except dns.tsig.BadSignature as error:
            raise DnsError(f"the DNS server {self.where} answered with a bad TSIG signature") from error
        except (OSError, dns.exception.DNSException) as error:
            raise DnsError(f"could not {what} the records on {self.where}: {_describe(error)}") from error
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            hint = RCODE_HINTS.get(rcode, f"it answered {dns.rcode.to_text(rcode)}")
            raise UpdateRefused(f"the DNS server {self.where} did not {what} the records with key {key!r}: {hint}")


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name)


def _rdata_text(record: DnsRecord) -> str:
    if record.type == "TXT":
        return '"' + record.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if record.type == "CNAME":
        return record.value.removesuffix(".") + "."
    return record.value


def _describe(error: BaseException) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "it did not answer in time"
    return str(error) or type(error).__name__
