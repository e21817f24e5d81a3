"""The served OpenAPI of POST /v1/vms must be the founding spec's, to the letter.

The expected schemas are parsed out of the seed file itself (its "Resolved
schema:" blocks), not copied here, so the seed stays the single source of truth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kiln.api.app import create_app
from kiln.config import Settings

SEED_NAME = "000_0297815c2ba82e2e.txt"
SCHEMA_MARKER = "Resolved schema:"


def find_seed() -> Path:
    """The seed lives in the shared docs next to the repo; KILN_SEED_FILE may point elsewhere."""
    candidates = [
        os.environ.get("KILN_SEED_FILE"),
        Path(__file__).resolve().parents[3] / "shared" / "seeds" / SEED_NAME,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    message = f"seed file {SEED_NAME} not found (set KILN_SEED_FILE)"
    if os.environ.get("CI"):
        # CI lays shared/ beside the clone: there, a missing seed is a broken check.
        pytest.fail(message)
    pytest.skip(message)


def seed_schemas() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The request, 200 and 422 schemas, in the order the seed lists them."""
    text = find_seed().read_text()
    decoder = json.JSONDecoder()
    schemas = []
    position = text.find(SCHEMA_MARKER)
    while position != -1:
        start = text.index("{", position)
        schema, end = decoder.raw_decode(text, start)
        schemas.append(schema)
        position = text.find(SCHEMA_MARKER, end)
    assert len(schemas) == 3, f"expected 3 resolved schemas in the seed, found {len(schemas)}"
    return schemas[0], schemas[1], schemas[2]


def resolve(node: Any, document: dict[str, Any]) -> Any:
    """Inline every local $ref, as the seed's "resolved" schemas are."""
    if isinstance(node, dict):
        if "$ref" in node:
            assert set(node) == {"$ref"}, f"$ref with siblings: {node}"
            target: Any = document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolve(target, document)
        return {key: resolve(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, document) for item in node]
    return node


def strict(value: Any) -> Any:
    """A form of a JSON value where 1 and 1.0 and True differ, as they do in JSON text."""
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict(item) for item in value]
    return (type(value).__name__, value)


def assert_same_schema(served: dict[str, Any], seed: dict[str, Any], where: str) -> None:
    # No key is ignored: the served schema carries no description or other extra key.
    assert set(served.get("properties", {})) == set(seed.get("properties", {})), where
    for name, expected in seed.get("properties", {}).items():
        assert strict(served["properties"][name]) == strict(expected), f"{where}.{name}"
    assert sorted(served.get("required", [])) == sorted(seed.get("required", [])), where
    rest = {key: value for key, value in served.items() if key not in ("properties", "required")}
    seed_rest = {key: value for key, value in seed.items() if key not in ("properties", "required")}
    assert strict(rest) == strict(seed_rest), where


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("openapi"))
    # Building the document needs no runtime; placeholders keep QEMU out of it.
    app = create_app(settings, hypervisor=object(), images=object())  # type: ignore[arg-type]
    return app.openapi()


@pytest.fixture(scope="module")
def create_vm(openapi: dict[str, Any]) -> dict[str, Any]:
    return openapi["paths"]["/v1/vms"]["post"]


def media_schema(content_owner: dict[str, Any], openapi: dict[str, Any]) -> dict[str, Any]:
    return resolve(content_owner["content"]["application/json"]["schema"], openapi)


def test_request_body_is_the_seeds(create_vm: dict[str, Any], openapi: dict[str, Any]) -> None:
    expected, _, _ = seed_schemas()
    assert create_vm["requestBody"]["required"] is True
    assert_same_schema(media_schema(create_vm["requestBody"], openapi), expected, "request")


def test_success_response_is_the_seeds(
    create_vm: dict[str, Any], openapi: dict[str, Any]
) -> None:
    _, expected, _ = seed_schemas()
    response = create_vm["responses"]["200"]
    assert response["description"] == "Successful Response"
    assert_same_schema(media_schema(response, openapi), expected, "200")


def test_validation_error_is_the_seeds(
    create_vm: dict[str, Any], openapi: dict[str, Any]
) -> None:
    _, _, expected = seed_schemas()
    response = create_vm["responses"]["422"]
    assert response["description"] == "Validation Error"
    assert_same_schema(media_schema(response, openapi), expected, "422")


def test_only_the_seeds_responses(create_vm: dict[str, Any]) -> None:
    assert set(create_vm["responses"]) == {"200", "422"}


def test_parameters_are_the_seeds(create_vm: dict[str, Any]) -> None:
    parameters = {parameter["name"]: parameter for parameter in create_vm["parameters"]}
    assert set(parameters) == {"wait", "X-API-Key"}

    wait = parameters["wait"]
    assert (wait["in"], wait["required"]) == ("query", False)
    assert wait["schema"]["type"] == "boolean"
    assert strict(wait["schema"]["default"]) == strict(True)
    assert wait["description"] == "Wait for VM to be provisioned"

    api_key = parameters["X-API-Key"]
    assert (api_key["in"], api_key["required"]) == ("header", False)
    assert api_key["schema"]["anyOf"] == [{"type": "string"}, {"type": "null"}]


def test_security_is_oauth2_password_bearer(
    create_vm: dict[str, Any], openapi: dict[str, Any]
) -> None:
    assert create_vm["security"] == [{"OAuth2PasswordBearer": []}]
    scheme = openapi["components"]["securitySchemes"]["OAuth2PasswordBearer"]
    assert scheme["type"] == "oauth2"
    assert scheme["flows"]["password"]["tokenUrl"] == "/v1/auth/token"


def test_summary_is_the_seeds_title(create_vm: dict[str, Any]) -> None:
    assert create_vm["summary"] == "Create Vm"
