"""The architecture holds: every module imports on its own, no import cycles,
arrows between packages point down only, and every package says what it owns."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import kiln

ROOT = Path(kiln.__file__).parent

# What each package must never import (DESIGN.md, "Layers inside kiln/").
FORBIDDEN: dict[str, set[str]] = {
    "store": {"api", "services", "node", "runtime", "net", "volumes", "guest", "schemas"},
    "runtime": {"api", "services", "store", "node", "net", "volumes", "schemas"},
    "net": {"api", "services", "store", "schemas", "volumes"},
    "volumes": {"api", "services", "store", "schemas", "net"},
    "node": {"api", "services", "store", "schemas"},
    "services": {"api", "router", "sshd"},
    # The share router is a process of its own: it reads the store, never the services' memory.
    "router": {"api", "services", "node", "runtime", "volumes", "guest", "schemas"},
    # Custom domains' mechanism (DNS, ACME, certificate files): no users, rows or HTTP routes.
    "domains": {"api", "services", "store", "node", "runtime", "net", "volumes", "schemas", "router", "guest"},
    # So is the SSH gateway: the store for logins, the server's guest relay for everything else.
    "sshd": {"api", "services", "node", "runtime", "volumes", "schemas"},
    "crypto": {"api", "services", "store", "node", "runtime", "net", "volumes", "schemas", "router", "guest"},
    "schemas": {"api", "services", "node", "runtime"},
    "guest": {"api", "services", "store", "node", "runtime", "schemas", "config", "net", "volumes"},
    # The browser's mechanism (Chromium in a guest, Playwright over CDP): no users, rows or routes.
    "browser": {"api", "services", "store", "node", "schemas", "net", "volumes", "router", "sshd", "proxy", "vault"},
    # Vaults' mechanisms (crypto, hosts, auth shapes, the CA): a leaf the services and the proxy use.
    "vault": {"api", "services", "store", "node", "runtime", "schemas", "net", "volumes", "guest", "proxy"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in ROOT.rglob("*.py")
        if "migrations" not in path.parts and "__pycache__" not in path.parts
    }


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path) -> set[str]:
    """The kiln modules ``name`` imports when it runs (imports only for type
    checkers do not count: they cannot make a cycle at run time)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    modules = all_modules()
    return {module for module in found if module in modules and module != name}


def test_there_is_no_import_cycle() -> None:
    modules = all_modules()
    graph = {name: imports_of(name, path) for name, path in modules.items()}
    # Tarjan's strongly connected components: a component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph[node]:
            if neighbour not in index:
                connect(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            connect(node)
    # A package's __init__ that re-exports its own modules is not a cycle between them.
    real = [cycle for cycle in cycles if not _only_a_package_face(cycle)]
    assert not real, f"import cycles: {real}"


def _only_a_package_face(cycle: list[str]) -> bool:
    packages = [name for name in cycle if (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()]
    return len(packages) == 1 and all(name.startswith(packages[0] + ".") or name == packages[0] for name in cycle)


def test_arrows_between_packages_point_down_only() -> None:
    wrong = []
    for name, path in all_modules().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in FORBIDDEN:
            continue
        for imported in imports_of(name, path):
            target = imported.split(".")[1] if imported.count(".") else ""
            if target in FORBIDDEN[parts[1]]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


# The dashboard is pages over the services: it calls them as the API's routers do,
# never a lower layer (its types come from the store only for type checkers).
DASHBOARD_FORBIDDEN = {"store", "node", "runtime", "net", "volumes", "guest", "vault", "proxy", "router", "sshd"}


def test_the_dashboard_only_calls_services() -> None:
    wrong = [
        f"{name} imports {imported}"
        for name, path in all_modules().items()
        if name.startswith("kiln.api.dashboard")
        for imported in imports_of(name, path)
        if imported.count(".") and imported.split(".")[1] in DASHBOARD_FORBIDDEN
    ]
    assert not wrong, "\n".join(wrong)


# Imports every module named on its command line first, each in a forked child of an
# interpreter that holds the third-party libraries kiln uses but no kiln module. A fork
# per module keeps each import clean (re-importing kiln in one process instead made
# SQLAlchemy's and pydantic's registries grow with every round, and took minutes), and
# the children run side by side, one per core.
IMPORT_EACH_FIRST = """
import importlib, os, sys, traceback
names, outside = sys.argv[1:], sys.stdin.read().split()
for name in outside:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # a submodule that only imports as part of its package: its package will
assert not [m for m in sys.modules if m == "kiln" or m.startswith("kiln.")]
running, failed = {}, []
while names or running:
    while names and len(running) < (os.cpu_count() or 1):
        name = names.pop()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        running[pid] = name
    pid, status = os.wait()
    if status:
        failed.append(running[pid])
    running.pop(pid)
print("failed:", *failed)
"""

LIST_OUTSIDE_MODULES = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # the forked import of it says why
print(*sorted(m for m in sys.modules if m != "kiln" and not m.startswith("kiln.")))
"""


def test_every_module_imports_on_its_own_in_any_order(tmp_path: Path) -> None:
    """Each module imported first, in a clean interpreter state for kiln (so no
    module works only because another happened to be imported before it)."""
    names = sorted(all_modules())
    # Compiled once into a cache of the test's own: every child would otherwise compile
    # its modules again where the environment forbids writing bytecode.
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT)], env=env, timeout=300, check=True)
    outside = subprocess.run(
        [sys.executable, "-c", LIST_OUTSIDE_MODULES, *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, *names],
        env=env,
        input=outside,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "failed:", result.stderr[-3000:]


def test_every_package_has_a_readme_saying_what_it_owns_and_may_import() -> None:
    # Sub-packages (runtime/qemu, services/snapshots) are described by their package's README.
    for package in sorted(path.parent for path in ROOT.glob("*/__init__.py")):
        readme = package / "README.md"
        assert readme.is_file(), f"{package} has no README.md"
        text = readme.read_text().lower()
        assert "own" in text and "import" in text, f"{readme} must say what it owns and what it may import"


def test_no_two_test_modules_share_a_name() -> None:
    """pytest imports test files by their basename (tests/ has no packages): a
    second ``test_x.py`` anywhere stops the whole run at collection."""
    tests = Path(__file__).parents[1]
    names = [path.name for path in tests.rglob("*.py") if path.name != "conftest.py"]
    assert sorted({name for name in names if names.count(name) > 1}) == []
