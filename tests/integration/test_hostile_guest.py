"""A guest that misbehaves harms only itself: a frozen agent gets every route on
its VM a clear answer within the route's deadline, and the VM can be deleted."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from live_api import SMALL, Api, build_images, live_server

from kiln.config import Settings

pytestmark = pytest.mark.vm

AGENT_DEADLINE = 3  # KILN_AGENT_DEADLINE_SECONDS for these servers
# Far above any deadline: only a route that never answers hits it.
HANG = 60.0


@pytest.fixture(scope="module")
def images() -> None:
    build_images(Settings())


@pytest.fixture
def api(images: None) -> Iterator[Api]:
    with live_server("kiln-hostile-", env={"KILN_AGENT_DEADLINE_SECONDS": str(AGENT_DEADLINE)}) as started:
        yield started


def freeze_agent(api: Api, session: str) -> None:
    """SIGSTOP the guest agent a moment after this exec (run by the agent) returned."""
    api.run(session, 'agent=$PPID; nohup sh -c "sleep 1; kill -STOP $agent" >/dev/null 2>&1 &')
    # Until the stop lands, calls may still be answered; wait it out in the guest's terms.
    deadline = 30
    for _ in range(deadline * 4):
        response = api.http.post(
            "/execute", json={"session_id": session, "command": "true", "language": "bash", "timeout": 1},
            timeout=HANG,
        )  # fmt: skip
        if response.status_code == 503:
            return
    pytest.fail("the agent never stopped answering")


def test_a_frozen_agent_gets_every_route_an_answer_and_the_vm_can_be_deleted(api: Api) -> None:
    vm = api.create_ok(**SMALL)
    vm_id, session = vm["vm_id"], vm["session_id"]
    freeze_agent(api, session)
    http = api.http

    def unavailable(response: httpx.Response) -> None:
        assert response.status_code == 503, response.text
        assert vm_id in response.json()["detail"]

    for language in ("bash", "python"):
        unavailable(http.post(
            "/execute", json={"session_id": session, "command": "echo hi", "language": language, "timeout": 2},
            timeout=HANG,
        ))  # fmt: skip
    unavailable(http.post("/upload", data={"remote_path": "/root/x", "session_id": session},
                          files={"file": ("x", b"payload")}, timeout=HANG))  # fmt: skip
    unavailable(http.post("/download", data={"filename": "/etc/hostname", "session_id": session}, timeout=HANG))
    unavailable(http.post(f"/v1/vms/{vm_id}/pty/sessions", json={}, timeout=HANG))
    unavailable(http.get(f"/v1/vms/{vm_id}/pty/sessions", timeout=HANG))
    streamed = http.post(f"/v1/vms/{vm_id}/execute/stream", json={"command": "echo hi", "timeout": 2}, timeout=HANG)
    assert streamed.status_code in (200, 503), streamed.text
    if streamed.status_code == 200:
        assert "error" in streamed.text  # the stream ends with the reason

    # Routes that need no agent keep working.
    assert http.get(f"/v1/vms/{vm_id}", timeout=HANG).json()["status"] == "running"
    assert http.get(f"/v1/sessions/usage/{session}", timeout=HANG).status_code == 200
    assert http.get(f"/v1/vms/{vm_id}/console", timeout=HANG).status_code == 200
    snapshot = http.post(f"/v1/vms/{vm_id}/snapshot", timeout=HANG)
    assert snapshot.status_code == 200 and snapshot.json()["status"] == "ready", snapshot.text

    deleted = http.delete(f"/v1/vms/{vm_id}", timeout=HANG)
    assert deleted.status_code == 200 and deleted.json()["status"] == "terminated", deleted.text
