"""Profile kiln's server while it creates VMs and runs code: ``python -m bench.profile``.

A manual tool, not part of ``kiln bench``. It starts a server as the bench
does, attaches py-spy to it (``pip install py-spy`` into the venv), makes
``--creates`` VMs (claimed from a warm pool with ``--pool N``) and runs
``--execs`` ``/execute`` calls, then stops py-spy and prints the kiln
functions that held the most samples (inclusive). The raw collapsed stacks are
kept for a flame graph (``flamegraph.pl`` / speedscope).

py-spy sees the server's own CPU, not the time it spends waiting for QEMU or
the guest: for those, compare ``kiln bench``'s figures with their raw baselines.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.suite import BASH_COMMAND, PYTHON_COMMAND, QUICK, Bench

TOP_FUNCTIONS = 30


def summarise(stacks_file: Path) -> list[tuple[str, int, int]]:
    """(function, samples holding it anywhere on the stack, total samples),
    kiln's and the libraries' functions that a request runs through."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        seen = set()
        for frame in stack.split(";"):
            # "function (path/to/file.py:line)": keep function and file, not line.
            name = frame.split(":")[0] + ")" if "(" in frame else frame
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
    return [(name, count, total) for name, count in inclusive.most_common(TOP_FUNCTIONS)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--creates", type=int, default=10)
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--pool", type=int, default=0, help="KILN_POOL_SIZE of the server")
    parser.add_argument("--out", type=Path, default=Path("bench-profile"))
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    arguments = parser.parse_args()
    # The venv's own py-spy first (it is installed there), then one on PATH.
    venv_py_spy = Path(sys.executable).with_name("py-spy")
    py_spy = str(venv_py_spy) if venv_py_spy.exists() else shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    arguments.out.mkdir(parents=True, exist_ok=True)
    stacks_file = (arguments.out / "server-stacks.txt").resolve()

    bench = Bench(QUICK, None)
    try:
        bench.prepare()
        bench.start_server(pool_size=arguments.pool, log_name="server.log")
        assert bench.server is not None and bench.server.pid is not None
        recorder = subprocess.Popen(
            [py_spy, "record", "--pid", str(bench.server.pid), "--format", "raw",
             "--rate", str(arguments.rate), "--output", str(stacks_file), "--nonblocking"],
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        timings: dict[str, list[float]] = {"create": [], "exec_bash": [], "exec_python": []}
        with bench.client() as client:
            for _ in range(arguments.creates):
                if arguments.pool:
                    bench.wait_for_pool(arguments.pool)
                elapsed, record = bench.create_vm(client)
                timings["create"].append(elapsed)
                bench.delete_vm(client, record["vm_id"])
            _, record = bench.create_vm(client)
            for _ in range(arguments.execs):
                timings["exec_bash"].append(bench.execute(client, record["session_id"], BASH_COMMAND, "bash"))
                timings["exec_python"].append(
                    bench.execute(client, record["session_id"], PYTHON_COMMAND, "python")
                )
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        recorder.wait(60)
    finally:
        bench.cleanup()
    for name, values in timings.items():
        if values:
            print(f"{name}: median {sorted(values)[len(values) // 2]:.1f} ms over {len(values)}")
    print(f"\ntop functions by inclusive samples ({stacks_file}):")
    for name, count, total in summarise(stacks_file):
        print(f"{100 * count / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
