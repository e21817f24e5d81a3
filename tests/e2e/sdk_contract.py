"""The SDK contract's table (sdk_contract.toml) and the SDK's own list of methods.

``sdk_methods`` walks the installed ``instavm`` package: the client's public
methods and those of each manager it hangs on itself (``client.vms``, ...), so a
newer SDK's new method shows up without anyone listing it. ``call_with_dummies``
calls a method with made-up arguments, which is all a refusal needs: no route
of an unbuilt feature looks at them.
"""

from __future__ import annotations

import inspect
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract_server import CONTRACT_TEMPLATE
from devbox_manifest import write_manifest
from instavm import InstaVM

TABLE = Path(__file__).with_name("sdk_contract.toml")
REFUSAL_WORDS = "not available on this server"


@dataclass(frozen=True)
class Row:
    method: str  # "execute", "vms.create"
    kind: str  # works, refused, elsewhere, not-done, local
    subject: str  # the feature refused, the test elsewhere ("" otherwise)


def load_rows() -> dict[str, Row]:
    table = tomllib.loads(TABLE.read_text())["methods"]
    rows: dict[str, Row] = {}

    def add(prefix: str, entries: dict[str, Any]) -> None:
        for name, value in entries.items():
            if isinstance(value, dict):
                add(f"{prefix}{name}.", value)
                continue
            kind, _, subject = str(value).partition(":")
            rows[prefix + name] = Row(prefix + name, kind.strip(), subject.strip())

    add("", table)
    return rows


def _public_methods(cls: type) -> list[str]:
    return [name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")]


def sdk_methods() -> set[str]:
    """Every public method of the client and of its managers, as ``manager.method``."""
    client = InstaVM(api_key="kiln_unused", base_url="http://127.0.0.1:9", auto_start_session=False)
    found = set(_public_methods(InstaVM))
    for attribute, value in vars(client).items():
        if not attribute.startswith("_") and type(value).__module__.startswith("instavm."):
            found.update(f"{attribute}.{name}" for name in _public_methods(type(value)))
    return found


def bound(client: InstaVM, method: str) -> Callable[..., Any]:
    target: Any = client
    for part in method.split("."):
        target = getattr(target, part)
    return target


def dummy(name: str, annotation: object, scratch: Path) -> object:
    """A made-up value for a required parameter, by its name and type."""
    text = str(annotation)
    if name == "dir_or_manifest":  # templates.publish: a devbox manifest
        return str(write_manifest(scratch / "template", CONTRACT_TEMPLATE))
    if name in ("file_path", "local_path"):
        path = scratch / "dummy.txt"
        path.write_text("contract\n")
        return str(path)
    if annotation is int or "int" in text and "str" not in text:
        return 1
    if annotation is bool or text == "bool":
        return True
    if "Dict" in text or "dict" in text or "Mapping" in text:
        return {}
    if "List" in text or "list" in text:
        return []
    return "contract-x"


# Optional arguments without which the SDK refuses to send anything at all.
EXTRA_ARGUMENTS: dict[str, dict[str, object]] = {
    "browser_navigate": {"session_id": "contract-x"},
    "browser_extract_content": {"session_id": "contract-x"},
    "browser_scroll": {"x": 1},
}


def call_with_dummies(client: InstaVM, method: str, scratch: Path) -> object:
    function = bound(client, method)
    arguments = {
        name: dummy(name, parameter.annotation, scratch)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return function(**arguments, **EXTRA_ARGUMENTS.get(method, {}))


def error_text(error: BaseException) -> str:
    """What an SDK exception says, its HTTP answer's body and its causes' texts."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 10:
        parts.append(str(seen))
        response = getattr(seen, "response", None)
        if response is not None:
            parts.append(f"status {response.status_code}: {response.text}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)
