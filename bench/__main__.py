"""``python -m bench [--quick] [--json FILE] [--only PHASES]`` from the checkout; ``kiln bench`` does the same."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.suite import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few samples; under 3 minutes")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--only", help="comma-separated phases to run (e.g. raw,exec)")
    arguments = parser.parse_args()
    sys.exit(main(arguments.quick, arguments.json, arguments.only))
