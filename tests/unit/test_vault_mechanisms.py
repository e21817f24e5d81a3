"""kiln.vault: service hosts, auth shapes, the catalog, the egress CA (a real TLS
handshake in memory) and the call journal; a credential sealed for its row."""

from __future__ import annotations

import json
import ssl
import stat
from pathlib import Path

import pytest

from kiln.crypto.sealing import SealError, seal, unseal
from kiln.vault import catalog
from kiln.vault.auth import AuthConfigError, parse_auth_config
from kiln.vault.binding import Injection, credential_context, injection_for
from kiln.vault.ca import CERT_FILE, KEY_FILE, EgressCa, ca_directory, read_certificate
from kiln.vault.hosts import HostError, best_match, host_matches, parse_service_host
from kiln.vault.journal import Call, CallJournal, request_path

KEY = bytes(range(32))


def test_a_credential_opens_only_for_its_own_row() -> None:
    sealed = seal(KEY, b"sk-live-123", credential_context("cred_1"))
    assert unseal(KEY, sealed, credential_context("cred_1")) == b"sk-live-123"
    with pytest.raises(SealError):
        unseal(KEY, sealed, credential_context("cred_2"))


# ---- hosts


@pytest.mark.parametrize(
    ("host", "canonical"),
    [("api.openai.com", "api.openai.com"), ("API.Example.COM.", "api.example.com"), ("*.example.com", "*.example.com")],
)
def test_service_hosts(host: str, canonical: str) -> None:
    assert parse_service_host(host) == canonical


@pytest.mark.parametrize("host", ["", "localhost", "1.2.3.4", "*.*.example.com", "a..b.com", "-a.com", "*.", "a b.com"])
def test_what_is_no_service_host(host: str) -> None:
    with pytest.raises(HostError):
        parse_service_host(host)


def test_a_wildcard_covers_one_level_and_exact_hosts_win() -> None:
    assert host_matches("*.example.com", "a.example.com")
    assert not host_matches("*.example.com", "example.com")
    assert not host_matches("*.example.com", "a.b.example.com")
    pairs = [("*.example.com", "wild"), ("api.example.com", "exact"), ("*.example.com", "later")]
    assert best_match(pairs, "api.example.com") == "exact"
    assert best_match(pairs, "www.example.com") == "wild"
    assert best_match(pairs, "example.org") is None


def test_the_injection_for_a_name() -> None:
    def injection(host: str, service: str) -> Injection:
        return Injection("v", service, host, "Authorization", "Bearer ", "c", "KEY", "sealed")

    both = (injection("*.echo.test", "wild"), injection("api.echo.test", "exact"))
    assert injection_for(both, "API.echo.test.").service_id == "exact"  # type: ignore[union-attr]
    assert injection_for(both, "x.echo.test").service_id == "wild"  # type: ignore[union-attr]
    assert "sealed" not in repr(both[0])
    assert Injection.from_json(json.loads(json.dumps(both[0].to_json()))) == both[0]


# ---- auth_config


def test_auth_config_shapes() -> None:
    bearer = parse_auth_config({"type": "bearer", "token": "OPENAI_API_KEY"})
    assert (bearer.header, bearer.prefix, bearer.credential) == ("Authorization", "Bearer ", "OPENAI_API_KEY")
    assert bearer.to_wire() == {"type": "bearer", "token": "OPENAI_API_KEY"}
    header = parse_auth_config({"type": "header", "header": "X-API-Key", "key": "K"})
    assert (header.header, header.prefix, header.to_wire()) == (
        "X-API-Key", "", {"type": "header", "header": "X-API-Key", "key": "K"},
    )  # fmt: skip
    api_key = parse_auth_config({"type": "api-key", "header": "Authorization", "key": "K", "prefix": "Token "})
    assert (api_key.prefix, api_key.to_wire()["type"]) == ("Token ", "api-key")


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        ({"type": "url-path", "token": "T", "placeholder": "T"}, "type", "'url-path' is not supported yet"),
        ({"type": "basic", "username": "U", "password": "P"}, "type", "'basic' is not supported yet"),
        ({"type": "oauth"}, "type", "must be 'bearer' or 'header'"),
        ({"type": "bearer"}, "token", "token must be a non-empty string"),
        ({"type": "header", "header": "X-Key"}, "key", "key must be"),
        ({"type": "header", "header": "Bad Header", "key": "K"}, "header", "header name"),
        ({"type": "header", "header": "Content-Length", "key": "K"}, "header", "frames the request"),
        ({"type": "header", "header": "X", "key": "K", "prefix": "a\nb"}, "prefix", "printable"),
        ("bearer", "type", "must be an object"),
    ],
)
def test_bad_auth_configs_name_their_field(config: object, field: str, words: str) -> None:
    with pytest.raises(AuthConfigError, match=words) as error:
        parse_auth_config(config)
    assert error.value.field == field


def test_every_catalog_template_is_a_valid_service() -> None:
    assert len(catalog.BY_ID) == len(catalog.CATALOG)
    for template in catalog.CATALOG:
        assert parse_service_host(template.host) == template.host
        assert parse_auth_config(template.auth_config()).credential == template.credential_key
        assert {"id", "name", "host", "auth_type"} <= set(template.to_wire())
    assert catalog.BY_ID["openai"].auth_config() == {"type": "bearer", "token": "OPENAI_API_KEY"}
    assert catalog.BY_ID["anthropic"].auth_config()["header"] == "x-api-key"


# ---- the egress CA


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake in memory (no sockets); raises what the client raises."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(c_in, c_out, server_hostname=name)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for label, side in (("client", client_side), ("server", server_side)):
            if not done[label]:
                try:
                    side.do_handshake()
                    done[label] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_the_egress_ca_is_made_once_and_signs_leaves_clients_verify(tmp_path: Path) -> None:
    directory = ca_directory(tmp_path)
    ca = EgressCa.load_or_create(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / CERT_FILE).stat().st_mode) == 0o644
    assert read_certificate(tmp_path) == ca.certificate_pem
    assert EgressCa.load_or_create(directory).certificate_pem == ca.certificate_pem  # kept across starts

    trusting = ssl.create_default_context(cadata=ca.certificate_pem)
    handshake(ca.server_context("api.echo.test"), trusting, "api.echo.test")
    assert ca.server_context("api.echo.test") is ca.server_context("api.echo.test")  # issued once
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        handshake(ca.server_context("api.echo.test"), trusting, "other.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.server_context("api.echo.test"), ssl.create_default_context(), "api.echo.test")


def test_a_certificate_lost_after_its_key_is_made_again(tmp_path: Path) -> None:
    directory = ca_directory(tmp_path)
    first = EgressCa.load_or_create(directory)
    (directory / CERT_FILE).unlink()
    again = EgressCa.load_or_create(directory)
    assert again.certificate.public_key() == first.certificate.public_key()


# ---- the journal


def call(**fields: object) -> Call:
    values = {
        "vm_id": "vm-1", "vault_id": "vault_1", "service_id": "svc_1", "credential_id": "cred_1",
        "credential_name": "KEY", "host": "api.echo.test", "method": "GET", "path": "/x", "status": 200,
    } | fields  # fmt: skip
    return Call.new(**values)


def test_the_journal_hands_over_whole_files(tmp_path: Path) -> None:
    journal = CallJournal(tmp_path)
    journal.append(one := call())
    journal.append(two := call(status=None, error="the certificate of api.echo.test is not trusted"))
    assert stat.S_IMODE(journal.current.stat().st_mode) == 0o600
    journal.rotate()
    journal.append(three := call(path="/later"))
    (taken,) = journal.taken()
    with taken.open("a") as file:
        file.write('{"half": \n')  # a damaged line costs that line only
    assert CallJournal.read(taken) == [one, two]
    journal.rotate()
    assert [c for path in journal.taken() for c in CallJournal.read(path)] == [one, two, three]
    journal.rotate()  # nothing new: nothing to hand over
    assert len(journal.taken()) == 2


def test_a_recorded_path_has_no_query() -> None:
    assert request_path("/v1/chat?api_key=guest-secret&x=1") == "/v1/chat"
