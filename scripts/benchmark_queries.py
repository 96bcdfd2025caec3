#!/usr/bin/env python3
"""Entry point; the logic lives in service/ingest/tools/query_benchmark.py. See `--help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from ingest.tools.query_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
