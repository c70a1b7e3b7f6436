"""``python -m servekit.bench``: the same as ``servekit bench``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
