"""The agent package as a whole: its ops, its imports, how it is installed into
images, and the bounded helpers every system op relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from unit.agent_process import AGENT_PACKAGE, GUEST_DIR, agent_env

from kiln.config import Settings
from kiln.guest import protocol
from kiln.guest.agent.config import AgentConfig
from kiln.guest.agent.deadlines import Deadline, call_with_deadline
from kiln.guest.agent.errors import AgentError
from kiln.guest.agent.server import Agent
from kiln.guest.agent.tools import run_tool
from kiln.runtime import images
from kiln.runtime.images import REPO_IMAGES_DIR, ImageStore, guest_files, install_guest

README = GUEST_DIR / "README.md"


def test_the_agent_serves_exactly_the_ops_the_protocol_lists() -> None:
    agent = Agent(AgentConfig(system=False))
    assert sorted(agent.handlers) == sorted(protocol.OPS)


def test_every_op_is_in_the_readme_ops_table() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", README.read_text(), flags=re.MULTILINE))
    assert documented == set(protocol.OPS)


def test_the_agent_imports_the_standard_library_and_its_own_directory_only() -> None:
    probe = (
        "import sys; import agent.__main__, agent.server; "
        "own = {'agent', 'protocol', '__main__'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names | own))"
    )
    output = subprocess.run(
        [sys.executable, "-S", "-c", probe], env=agent_env(), capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"


def test_every_module_of_the_package_is_installed_precompiled_and_runs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    install_guest(tree, busybox, REPO_IMAGES_DIR / "init", workdir="/root")
    installed = tree / "opt" / "kiln"
    modules = sorted(path.name for path in AGENT_PACKAGE.glob("*.py"))
    assert sorted(path.name for path in (installed / "agent").glob("*.py")) == modules
    compiled = {path.name.split(".")[0] for path in (installed / "agent" / "__pycache__").glob("*.pyc")}
    assert compiled == {name.removesuffix(".py") for name in modules}
    assert (installed / "protocol.py").is_file()
    # As the guest runs it: only /opt/kiln on the path.
    run = subprocess.run(
        [sys.executable, "-S", "-m", "agent", "--help"],
        env={"PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0 and "--no-system" in run.stdout, run.stderr


def test_the_image_key_covers_every_agent_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = tmp_path / "guest"
    shutil.copytree(GUEST_DIR, guest, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(images, "GUEST_DIR", guest)
    store = ImageStore(Settings(cache_dir=tmp_path / "cache", data_dir=tmp_path / "var"))
    manifest = store.manifest("default")
    assert guest_files() == [f"agent/{p.name}" for p in sorted(AGENT_PACKAGE.glob("*.py"))] + ["protocol.py"]
    keys = [store._local_inputs_digest(manifest)]
    (guest / "agent" / "exec.py").write_text((guest / "agent" / "exec.py").read_text() + "\n# changed\n")
    keys.append(store._local_inputs_digest(manifest))
    (guest / "agent" / "added.py").write_text("")
    keys.append(store._local_inputs_digest(manifest))
    (guest / "protocol.py").write_text((guest / "protocol.py").read_text() + "\n")
    keys.append(store._local_inputs_digest(manifest))
    assert len(set(keys)) == len(keys)


def test_a_tool_past_its_deadline_is_killed_and_the_op_fails(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    with pytest.raises(AgentError) as raised:
        run_tool(["sh", "-c", f"sleep 30; touch {marker}"], Deadline(0.3), "waiting for nothing")
    assert raised.value.code == "ETIMEDOUT" and "waiting for nothing" in str(raised.value)
    with pytest.raises(AgentError) as missing:
        run_tool(["/no/such/tool"], Deadline(5), "checking")
    assert missing.value.code == "ENOTSUP"
    result = run_tool(["sh", "-c", "echo out; echo err >&2; exit 3"], Deadline(10), "testing")
    assert (result.exit_code, result.output) == (3, "out\nerr")


def test_a_call_blocked_past_its_deadline_fails_and_the_lock_is_bounded() -> None:
    release = threading.Event()
    with pytest.raises(AgentError) as raised:
        call_with_deadline(release.wait, Deadline(0.2), "freezing /data")
    assert raised.value.code == "ETIMEDOUT"
    release.set()
    assert call_with_deadline(lambda: 42, Deadline(5), "answering") == 42
    lock = threading.Lock()
    lock.acquire()
    with pytest.raises(AgentError) as busy:
        Deadline(0.2).acquire(lock, "mount")
    assert busy.value.code == "ETIMEDOUT"
