#!/usr/bin/env python3
"""Hot model reload from a checkout: the same as `servekit reload ...` (see docs/reload.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servekit.reload.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
