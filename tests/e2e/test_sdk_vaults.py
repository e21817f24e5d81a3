"""Every vault method of the instavm SDK, unmodified, against a real ``kiln serve``
(no VM is needed: injection itself is tests/integration/test_vaults.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from instavm import InstaVM
from live_server import LiveServer, serving

VALUE = "sk-e2e-58f2b7c1d0a9"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serving("kiln-sdkv-", env={"KILN_LOG_LEVEL": "debug"}, build_image=False, after_stop=no_value_logged) as live:
        yield live


def no_value_logged(live: LiveServer) -> None:
    assert VALUE not in live.log_path.read_text(errors="replace"), "a credential value reached the server's log"


def test_every_vault_method_of_the_sdk(server: LiveServer) -> None:
    sdk = InstaVM(api_key=server.admin_key, base_url=server.url, auto_start_session=False)
    vault = sdk.create_vault("deploy", description="keys of the deploy bot")
    assert {"id", "name", "description", "created_at"} <= set(vault)
    vault_id = vault["id"]
    assert [v["id"] for v in sdk.list_vaults()] == [vault_id]
    assert sdk.get_vault(vault_id)["name"] == "deploy"
    assert sdk.update_vault(vault_id, name="deploy-bot")["name"] == "deploy-bot"

    credential = sdk.add_vault_credential(vault_id, name="OPENAI_API_KEY", value=VALUE, description="prod")
    assert credential["name"] == "OPENAI_API_KEY" and VALUE not in str(credential)
    rotated = sdk.rotate_vault_credential(vault_id, credential["id"], value=VALUE + "-new")
    assert rotated["id"] == credential["id"] and VALUE not in str(rotated)
    assert [c["name"] for c in sdk.list_vault_credentials(vault_id)] == ["OPENAI_API_KEY"]

    catalog = sdk.get_vault_catalog()
    assert {"id", "name", "host", "auth_type"} <= set(catalog[0])
    from_templates = sdk.add_vault_services_from_templates(vault_id, ["openai"])
    assert [s["host"] for s in from_templates["services"]] == ["api.openai.com"]
    sdk.add_vault_credential(vault_id, name="INTERNAL", value="v")
    custom = sdk.add_vault_service(
        vault_id, host="*.internal.example", auth_config={"type": "api-key", "header": "X-Token", "key": "INTERNAL"},
        description="everything internal",
    )  # fmt: skip
    services = sdk.list_vault_services(vault_id)
    assert {(s["host"], s["enabled"]) for s in services} == {("api.openai.com", True), ("*.internal.example", True)}
    assert all({"id", "host", "auth_config", "enabled"} <= set(s) for s in services)

    discovered = sdk.discover_vault(vault_id)
    assert sorted(discovered["hosts"]) == ["*.internal.example", "api.openai.com"]
    assert sorted(c["name"] for c in discovered["credentials"]) == ["INTERNAL", "OPENAI_API_KEY"]
    assert VALUE not in str(discovered)

    assert sdk.get_vault_request_logs(vault_id, limit=10) == []
    assert sdk.delete_vault_service(vault_id, custom["id"]) is True
    assert [s["host"] for s in sdk.list_vault_services(vault_id)] == ["api.openai.com"]
    assert sdk.delete_vault_credential(vault_id, credential["id"]) is True
    assert [c["name"] for c in sdk.list_vault_credentials(vault_id)] == ["INTERNAL"]
    assert sdk.delete_vault(vault_id) is True
    assert sdk.list_vaults() == []
    with pytest.raises(requests.HTTPError) as error:  # the SDK leaves 404s as requests' own error
        sdk.get_vault(vault_id)
    assert error.value.response.status_code == 404
