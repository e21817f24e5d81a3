"""``python -m kiln.proxy --config FILE``: the egress daemon (see ``kiln.proxy.daemon``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.proxy.daemon import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kiln.proxy", description="Kiln's egress daemon")
    parser.add_argument("--config", type=Path, required=True, help="the settings, as JSON (written by the supervisor)")
    main(parser.parse_args().config)
