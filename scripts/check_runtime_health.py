#!/usr/bin/env python3
"""Entry point; the logic lives in service/ingest/tools/runtime_health.py. See `--help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from ingest.tools.runtime_health import main

if __name__ == "__main__":
    sys.exit(main())
