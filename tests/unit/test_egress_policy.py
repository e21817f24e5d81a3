"""Egress policies as the service layer reads them: keys, the stored form, the
package-manager group and its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.node.participant import EgressRules
from kiln.services.egress_policy import (
    DEFAULT_PACKAGE_MANAGERS_FILE,
    EgressPolicies,
    PackageManagersFileError,
    allows_anything,
    canonical,
    check_policy,
)

SHIPPED = EgressPolicies.load(None)


def test_the_shipped_group_names_the_registries_of_pip_npm_and_apt() -> None:
    assert SHIPPED.source == DEFAULT_PACKAGE_MANAGERS_FILE
    for domain in ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "deb.debian.org", "security.debian.org"):
        assert domain in SHIPPED.package_manager_domains, domain


def test_the_group_opens_its_domains_over_both_schemes_and_nothing_else() -> None:
    rules = SHIPPED.rules({"allow_package_managers": True, "allowed_domains": ["a.test"], "allow_https": True})
    assert rules == EgressRules(
        allowed_domains=("a.test",), allow_https=True, web_domains=SHIPPED.package_manager_domains
    )
    # InstaVM's name of the key means the same.
    assert SHIPPED.rules({"allow_public_repos": True}) == EgressRules(web_domains=SHIPPED.package_manager_domains)
    assert SHIPPED.rules({"allow_package_managers": False}) == EgressRules()
    assert SHIPPED.rules(None) == EgressRules()


def test_canonical_form_has_every_key_under_one_name() -> None:
    assert canonical(None) == {
        "allow_package_managers": False,
        "allow_http": False,
        "allow_https": False,
        "allowed_domains": [],
        "allowed_cidrs": [],
    }
    assert canonical({"allow_public_repos": True, "allowed_cidrs": ["10.0.0.1"]}) == {
        "allow_package_managers": True,
        "allow_http": False,
        "allow_https": False,
        "allowed_domains": [],
        "allowed_cidrs": ["10.0.0.1"],
    }


@pytest.mark.parametrize(
    ("policy", "allows"),
    [
        (None, False),
        ({}, False),
        ({"allowed_domains": ["a.test"]}, False),  # no scheme: the DNS answers nothing
        ({"allow_http": True, "allow_https": True}, False),  # schemes without domains
        ({"allowed_domains": ["a.test"], "allow_http": True}, True),
        ({"allowed_cidrs": ["1.2.3.4"]}, True),
        ({"allow_public_repos": True}, True),
    ],
)
def test_what_allows_anything(policy: dict | None, allows: bool) -> None:
    assert allows_anything(policy) is allows


def test_key_problems_are_located() -> None:
    problems = check_policy(
        {"allow_http": "yes", "allowed_cidrs": "1.2.3.4", "surprise": 1, "allowed_domains": ["ok", 3]},
        ("egress_policy",),
    )
    assert {problem.loc: problem.msg for problem in problems} == {
        ("egress_policy", "allow_http"): "must be a boolean",
        ("egress_policy", "allowed_cidrs"): "must be a list of strings",
        ("egress_policy", "allowed_domains"): "must be a list of strings",
        ("egress_policy", "surprise"): "unknown egress policy key",
    }
    (disagree,) = check_policy({"allow_package_managers": True, "allow_public_repos": False}, ())
    assert disagree.loc == ("allow_public_repos",) and "disagree" in disagree.msg
    assert check_policy({"allow_package_managers": True, "allow_public_repos": True}, ()) == []


def test_an_operator_file_replaces_the_group(tmp_path: Path) -> None:
    path = tmp_path / "pm.toml"
    path.write_text('[pip]\ndomains = ["pypi.internal.example", "*.mirror.example"]\n[empty]\ndomains = []\n')
    policies = EgressPolicies.load(path)
    assert policies.package_manager_domains == ("pypi.internal.example", "*.mirror.example")
    assert policies.source == path


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[pip\n", "is not TOML"),
        ('domains = ["pypi.org"]\n', "[domains] must hold only domains"),
        ('[pip]\ndomains = "pypi.org"\n', "[pip] must hold only domains"),
        ('[pip]\ndomains = ["pypi.org"]\nmirrors = []\n', "[pip] must hold only domains"),
        ('[pip]\ndomains = ["not a name"]\n', "'not a name' is not a host name"),
    ],
)
def test_a_broken_file_is_refused_naming_it(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "pm.toml"
    path.write_text(text)
    with pytest.raises(PackageManagersFileError) as error:
        EgressPolicies.load(path)
    assert str(path) in str(error.value) and "KILN_EGRESS_PACKAGE_MANAGERS_FILE" in str(error.value)
    assert complaint in str(error.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageManagersFileError, match="cannot be read"):
        EgressPolicies.load(tmp_path / "nope.toml")
