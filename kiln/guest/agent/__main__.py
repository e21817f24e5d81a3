"""``python3 -S -m agent``: parse the command line, pick the transport, serve."""

from __future__ import annotations

import argparse
import os
import time

from .config import AgentConfig
from .server import Agent
from .transport import InheritedSocket, ListeningSocket, Transport, VirtioPort
from .wire import log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = AgentConfig()
    parser = argparse.ArgumentParser(prog="agent", description="The Kiln guest agent.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", help="listen on this unix socket instead of the virtio port")
    where.add_argument("--fd", type=int, help="serve this inherited, connected socket fd")
    parser.add_argument("--workdir", help="default working directory of exec and python")
    parser.add_argument(
        "--etc-dir",
        default=defaults.etc_dir,
        help="where environment, hostname, resolv.conf and the CA bundle are written",
    )
    parser.add_argument(
        "--no-system",
        action="store_true",
        help="never set the clock or hostname, nor power off, and refuse the network and mount "
        "ops outside a namespace of the agent's own (for running on a host)",
    )
    # For tests on a developer host: where the system ops look and what they run.
    parser.add_argument("--local-ca-dir", default=defaults.local_ca_dir, help=argparse.SUPPRESS)
    parser.add_argument("--busybox", default=defaults.busybox, help=argparse.SUPPRESS)
    parser.add_argument("--sys-dir", default=defaults.sys_dir, help=argparse.SUPPRESS)
    parser.add_argument("--dev-dir", default=defaults.dev_dir, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    agent = Agent(
        AgentConfig(
            workdir=options.workdir,
            system=not options.no_system,
            etc_dir=options.etc_dir,
            local_ca_dir=options.local_ca_dir,
            busybox=options.busybox,
            sys_dir=options.sys_dir,
            dev_dir=options.dev_dir,
        )
    )
    if options.fd is not None:
        transport: Transport = InheritedSocket(options.fd)
    elif options.socket:
        transport = ListeningSocket(options.socket)
    else:
        transport = VirtioPort()
    log(f"serving (pid {os.getpid()}, uptime {time.clock_gettime(time.CLOCK_BOOTTIME):.2f})")
    agent.serve(transport)


if __name__ == "__main__":
    main()
