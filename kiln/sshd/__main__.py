"""``python -m kiln.sshd --config FILE``: the SSH gateway (see ``kiln.sshd.daemon``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.sshd.daemon import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kiln.sshd", description="Kiln's SSH gateway")
    parser.add_argument("--config", type=Path, required=True, help="the settings, as JSON (written by the supervisor)")
    main(parser.parse_args().config)
