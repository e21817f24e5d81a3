"""What a browser session may open, by its VM's egress policy (pure rules), and
the request shapes the SDK's browser calls are held to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.node.participant import EgressRules
from kiln.schemas.browser import ScrollRequest, WaitRequest
from kiln.services.browser import navigation_refusal

WEB = EgressRules(allowed_domains=("allowed.test", "*.example.org"), allow_http=True)


@pytest.mark.parametrize(
    "url", ["http://allowed.test/form", "http://a.b.example.org:8080/x", "about:blank", "data:text/html,<p>hi"]
)
def test_what_the_policy_allows_opens(url: str) -> None:
    assert navigation_refusal(url, WEB) is None


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://denied.test/", "does not allow http to denied.test"),
        ("https://allowed.test/", "does not allow https to allowed.test"),  # allow_https is off
        ("http://example.org/", "does not allow http to example.org"),  # a wildcard is below the name only
        ("http://203.0.113.9/", "does not allow the address 203.0.113.9"),
        ("file:///etc/passwd", "only http(s), about: and data: URLs"),
        ("chrome://settings", "only http(s), about: and data: URLs"),
        ("http:///nohost", "only http(s), about: and data: URLs"),
    ],
)
def test_what_it_does_not_is_refused_by_name(url: str, named: str) -> None:
    refusal = navigation_refusal(url, WEB)
    assert refusal is not None and named in refusal


def test_addresses_follow_the_cidrs_and_the_package_managers_follow_their_group() -> None:
    rules = EgressRules(allowed_cidrs=("203.0.113.0/28",), web_domains=("pypi.org",))
    assert navigation_refusal("http://203.0.113.9/", rules) is None
    assert navigation_refusal("https://pypi.org/simple/", rules) is None
    assert navigation_refusal("http://203.0.113.99/", rules) is not None


def test_requests_that_say_nothing_to_do_are_refused() -> None:
    with pytest.raises(ValidationError, match="give a selector"):
        ScrollRequest(session_id="s")
    with pytest.raises(ValidationError, match="needs a selector"):
        WaitRequest(session_id="s", condition="visible")
    assert WaitRequest(session_id="s", condition="load").timeout == 30_000
