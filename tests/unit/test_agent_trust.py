"""trust_ca on this host: the agent's bundle, local CA dir and /etc are scratch dirs."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from unit.agent_process import AgentConnection, running_agent
from unit.certs import make_ca

TRUST_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT")


def common_names(context: ssl.SSLContext) -> list[str]:
    """The commonName of every CA the context loaded, sorted."""
    names = []
    for certificate in context.get_ca_certs():
        subject = cast(tuple[tuple[tuple[str, str], ...], ...], certificate["subject"])
        names += [value for rdn in subject for key, value in rdn if key == "commonName"]
    return sorted(names)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentConnection]:
    etc = tmp_path / "etc"
    etc.mkdir()
    with running_agent(
        "--etc-dir", str(etc), "--local-ca-dir", str(tmp_path / "local-ca"), "--workdir", str(tmp_path)
    ) as connection:
        connection.etc = etc
        yield connection


def test_an_image_without_a_bundle_gets_one_and_every_client_variable(
    agent: AgentConnection, tmp_path: Path
) -> None:
    ca = make_ca("Kiln egress CA")
    value = agent.call("trust_ca", pem=ca.pem, name="kiln-egress")
    bundle = agent.etc / "ssl" / "certs" / "ca-certificates.crt"
    assert value["bundle"] == str(bundle)
    assert value["certificate"] == str(tmp_path / "local-ca" / "kiln-egress.crt")
    assert (tmp_path / "local-ca" / "kiln-egress.crt").read_text().strip() == ca.pem.strip()
    # The bundle is one a TLS library loads, and it holds exactly this CA.
    context = ssl.create_default_context(cafile=str(bundle))
    assert common_names(context) == ["Kiln egress CA"]
    out, _, _ = agent.run(shell="env")
    seen = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    assert {name: seen.get(name) for name in TRUST_VARIABLES} == {
        name: str(bundle) for name in TRUST_VARIABLES
    }
    environment = (agent.etc / "environment").read_text()
    assert all(f'{name}="{bundle}"' in environment for name in TRUST_VARIABLES)


def test_an_existing_bundle_is_kept_and_each_name_is_in_it_once(agent: AgentConnection) -> None:
    system_ca = make_ca("A public CA")
    bundle = agent.etc / "ssl" / "certs" / "ca-certificates.crt"
    bundle.parent.mkdir(parents=True)
    bundle.write_text(system_ca.pem)
    first, second, other = make_ca("Egress CA 1"), make_ca("Egress CA 2"), make_ca("Another CA")

    agent.call("trust_ca", pem=first.pem, name="egress")
    agent.call("trust_ca", pem=first.pem, name="egress")  # idempotent
    assert bundle.read_text().count("BEGIN CERTIFICATE") == 2
    agent.call("trust_ca", pem=second.pem, name="egress")  # a new CA under the same name replaces it
    agent.call("trust_ca", pem=other.pem, name="other")
    text = bundle.read_text()
    assert text.startswith(system_ca.pem)
    assert second.pem in text and other.pem in text and first.pem not in text
    context = ssl.create_default_context(cafile=str(bundle))
    assert common_names(context) == ["A public CA", "Another CA", "Egress CA 2"]


def test_bad_certificates_and_names_are_refused(agent: AgentConnection) -> None:
    ca = make_ca()
    assert agent.error("trust_ca", pem="not a certificate", name="x") == "EINVAL"
    broken = "-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n"
    assert agent.error("trust_ca", pem=broken, name="x") == "EINVAL"
    assert agent.error("trust_ca", pem=ca.pem, name="../escape") == "EINVAL"
    assert agent.error("trust_ca", pem=ca.pem) == "EINVAL"
    assert not (agent.etc / "ssl").exists()
