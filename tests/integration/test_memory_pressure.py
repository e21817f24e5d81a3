"""A host short of memory, for real: a process of the test takes the host's
memory until ``MemAvailable`` is below the server's floors, and a real server
with two real VMs refuses new VMs first, then suspends the idlest VM first.

The floors are set from the memory available when the server starts; each
allocation is sized from what is available just before it, so as to land in
the middle of a band 1.5 GB wide (what other processes do meanwhile moves it
by far less).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from live_api import SMALL, build_images, live_server, wait_until

from kiln.config import Settings
from kiln.services.memory_pressure import available_mb

pytestmark = pytest.mark.vm

BAND_MB = 1500
TAKE = "import sys, time; held = b'k' * (int(sys.argv[1]) << 20); print('held', flush=True); time.sleep(600)"


@contextmanager
def taken(megabytes: int) -> Iterator[None]:
    """A process that holds ``megabytes`` of touched memory while the block runs."""
    holder = subprocess.Popen([sys.executable, "-c", TAKE, str(max(megabytes, 0))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_host_short_of_memory_refuses_new_vms_then_suspends_the_idlest() -> None:
    build_images(Settings())
    start = available_mb()
    if start < 4 * BAND_MB:
        pytest.skip(f"the host has {start} MB available; this test takes {3 * BAND_MB} MB of it")
    floor, reclaim_floor = start - BAND_MB, start - 2 * BAND_MB
    env = {"KILN_MEMORY_FLOOR_MB": str(floor), "KILN_MEMORY_RECLAIM_FLOOR_MB": str(reclaim_floor)}
    with live_server("kiln-mem-", env=env) as api:
        idle = api.create_ok(**SMALL)
        busy = api.create_ok(**SMALL)
        assert api.run(busy["session_id"], "echo busy").strip() == "busy"

        # Between the floors: no new VM, and the running ones go on.
        with taken(available_mb() - (floor + reclaim_floor) // 2):
            refused = api.create(**SMALL)
            assert refused.status_code == 503, refused.text
            assert "KILN_MEMORY_FLOOR_MB" in refused.json()["detail"]
            assert not wait_until(lambda: api.vm(idle["vm_id"])["status"] != "running", 5)
            assert api.vm(busy["vm_id"])["status"] == "running"

            # Below the reclaim floor: the idlest VM is suspended first.
            with taken(available_mb() - (reclaim_floor - BAND_MB // 2)):
                assert wait_until(lambda: api.vm(idle["vm_id"])["status"] == "suspended", 120), api.vm(idle["vm_id"])
                log = api.server.log_path.read_text()
                first = log.index(f"suspending vm {idle['vm_id']}")
                assert f"suspending vm {busy['vm_id']}" not in log[:first]

        # Memory back: creates are admitted again, and the suspended VM resumes.
        assert api.create_ok(**SMALL)["status"] == "running"
        resumed = api.http.post(f"/v1/vms/{idle['vm_id']}/resume", params={"wait": True})
        assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
        assert api.run(idle["session_id"], "echo back").strip() == "back"
