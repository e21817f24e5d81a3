"""Every JSON body the API takes refuses a field it does not know (issue 15:
"nothing is silently dropped"): the SDK must never believe a setting took effect
that Kiln has no such setting for. The routes come from the served OpenAPI
document, so a new route with a lenient body fails here."""

from __future__ import annotations

import re
from collections.abc import Callable

from unit.harness import AppRunner, key_headers

UNKNOWN = "kiln_has_no_such_field"


def json_body_routes(document: dict) -> list[tuple[str, str]]:
    routes = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                routes.append((method, path))
    return sorted(routes)


async def test_every_json_body_refuses_an_unknown_field_by_name(
    run_app: AppRunner, admin_key: Callable[[], str]
) -> None:
    async with run_app() as client:
        routes = json_body_routes((await client.get("/openapi.json")).json())
        auth = key_headers(admin_key())
        # Routes of a VM or session look it up before they read the body.
        vm = (await client.post("/v1/vms", json={}, headers=auth)).json()
        ids = {"vm_id": vm["vm_id"], "session_id": vm["session_id"]}
        lenient = []
        for method, path in routes:
            url = re.sub(r"\{([^}]+)\}", lambda match: ids.get(match[1], "no-such-id"), path)
            response = await client.request(method, url, json={UNKNOWN: 1}, headers=auth)
            problems = response.json().get("detail") if response.status_code == 422 else None
            named = isinstance(problems, list) and any(p["loc"] == ["body", UNKNOWN] for p in problems)
            if not named:
                lenient.append(f"{method.upper()} {path}: {response.status_code} {response.text[:200]}")
    # The list is long enough to mean something: every resource has a body route.
    assert len(routes) > 40
    assert not lenient, "\n".join(lenient)
