"""``kiln bench --quick`` runs to its end and produces every figure.

What the numbers are is bench/README.md's business, not a test's: nothing
here is timed. It checks that each figure of CONTRACT.md was measured (or, for
a feature kiln does not have yet, is null with a reason), in the contract's
shape, and that no create failed under concurrency.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import Settings
from kiln.runtime.images import ImageStore

pytestmark = pytest.mark.vm

STABLE_FIGURES = (
    "raw_restore_ms",
    "create_cold_ms",
    "create_snapshot_ms",
    "create_pool_ms",
    "exec_raw_agent_ms",
    "exec_bash_ms",
    "exec_python_ms",
    "snapshot_save_ms",
    "concurrent_creates_per_s",
    "concurrent_create_failures",
    "density_idle_vms",
    "density_rss_mb_per_vm",
    "density_exec_ms",
    "api_list_rps",
)
FIGURE_KEYS = {"median", "p95", "unit", "samples", "baseline"}


@pytest.mark.timeout(900)  # a safety net for a wedged run, not a performance check
def test_quick_bench_produces_every_figure(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if ImageStore(Settings()).get("default") is None:
        pytest.skip("the default image is not built (kiln images build default)")
    output = tmp_path / "bench.json"

    run = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "bench", "--quick", "--json", str(output)],
        capture_output=True,
        text=True,
    )

    assert run.returncode == 0, f"kiln bench failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    document = json.loads(output.read_text())
    figures = document["figures"]
    assert document["host"]["load_average_start"], "the host section states the load"
    for name in STABLE_FIGURES:
        assert name in figures, f"{name} is missing"
    problems = []
    for name, figure in figures.items():
        assert FIGURE_KEYS <= figure.keys(), f"{name} lacks {FIGURE_KEYS - figure.keys()}"
        if figure["baseline"] is not None:
            assert figure["baseline"] in figures, f"{name}'s baseline {figure['baseline']} is not a figure"
        # Every figure has a value: each server gets networking names of its own
        # (kiln.net.instances), so shares, ssh and egress run beside other servers.
        if figure["median"] is None:
            problems.append(f"{name}: no value ({figure.get('reason')})")
    assert not problems, "\n".join(problems) + f"\n{run.stderr[-3000:]}"
    assert figures["concurrent_create_failures"]["values"] == [0] * figures["concurrent_create_failures"]["samples"]
    assert figures["concurrent_create_failures"]["samples"] >= 1
