#!/usr/bin/env python3
"""``make bench``: our handler vs TorchServe's stock handler (flags: ``python scripts/bench.py --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servekit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
