"""Optional dependencies (pyproject's extras): fail with the extra to install, not an ImportError."""

from __future__ import annotations

import importlib.util

from .errors import ConfigError


def require(module: str, extra: str, what: str) -> None:
    """Raise ConfigError naming ``pip install 'servekit[extra]'`` when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs {module.split('.')[0]}, not installed here: pip install 'servekit[{extra}]'")
