"""``python -m kiln.router --config FILE``: the share router (see ``kiln.router.daemon``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.router.daemon import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kiln.router", description="Kiln's share router")
    parser.add_argument("--config", type=Path, required=True, help="the settings, as JSON (written by the supervisor)")
    main(parser.parse_args().config)
