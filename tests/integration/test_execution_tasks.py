"""Async execution tasks across server restarts, with a real server and a real VM.

A finished task's result is in the database and survives any restart. A task
running when its server goes away (stopped with SIGTERM, or killed as in a
crash) never stays pending: the next start reports it complete, with an error.
The VM itself survives both restarts (the new server adopts it).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from live_server import (
    destroy_leftover_vms,
    ensure_default_image,
    server_settings,
    short_data_dir,
    start_server,
    terminate_live_vms,
)

pytestmark = pytest.mark.vm


def wait_for_task(http: httpx.Client, task_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = http.get(f"/v1/executions/{task_id}").json()
        if task["is_complete"] or time.monotonic() > deadline:
            return task
        time.sleep(0.2)


@pytest.fixture
def data_dir() -> Iterator:
    directory = short_data_dir("kiln-tasks-")
    settings = server_settings(directory)
    ensure_default_image(settings)
    try:
        yield directory
    finally:
        destroy_leftover_vms(settings)
        shutil.rmtree(directory, ignore_errors=True)
        directory.with_name(directory.name + ".log").unlink(missing_ok=True)


def test_task_results_outlive_restarts_and_cut_off_tasks_end_with_an_error(data_dir) -> None:
    server = start_server(data_dir)
    key = server.admin_key
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120) as http:
            session = http.post(
                "/v1/sessions/session", json={"memory_mb": 256, "vcpu_count": 1}
            ).json()
            sid = session["session_id"]
            done = http.post(
                "/execute_async", json={"session_id": sid, "command": "print(6 * 7)"}
            ).json()
            assert wait_for_task(http, done["task_id"])["serialized_stdout"] == "42\n"
            # Bash, not python: the cut-off run goes on in the guest, and a python
            # session would stay busy with it.
            crashed = http.post(
                "/execute_async",
                json={"session_id": sid, "command": "sleep 300", "language": "bash"},
            ).json()
            assert http.get(f"/v1/executions/{crashed['task_id']}").json()["is_complete"] is False

        server.stop(crash=True)
        server = start_server(data_dir)
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120) as http:
            kept = http.get(f"/v1/executions/{done['task_id']}").json()
            assert kept["is_complete"] and kept["serialized_stdout"] == "42\n"
            assert kept["exit_code"] == 0
            cut_off = http.get(f"/v1/executions/{crashed['task_id']}").json()
            assert cut_off["is_complete"] is True and cut_off["status"] == "failed"
            assert "restarted" in cut_off["error"]
            assert "did not finish" in cut_off["serialized_stderr"]
            # The adopted VM runs code as before.
            assert http.get(f"/v1/sessions/status/{sid}").json()["vm_status"] == "active"
            again = http.post("/execute", json={"session_id": sid, "command": "print('back')"})
            assert again.json()["stdout"] == "back\n"

            stopped = http.post(
                "/execute_async",
                json={"session_id": sid, "command": "sleep 300", "language": "bash"},
            ).json()
        server.stop()  # SIGTERM: a clean stop
        server = start_server(data_dir)
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120) as http:
            ended = http.get(f"/v1/executions/{stopped['task_id']}").json()
            assert ended["is_complete"] is True and ended["status"] == "failed"
            assert "stopped" in ended["error"]
    finally:
        try:
            terminate_live_vms(server.url, [key])
        finally:
            server.stop()
